// CUDA: the loss forms on the mined pairs (section 3) and their backward, computing what
// cpu/losses.cpp computes. The pair distances are measured here, dimension by dimension in the
// accumulation type without FMA, so they equal the CPU's bit for bit; every sum has a fixed
// order (or is an integer sum), so results are bitwise reproducible, except the feature
// gradient's default path, which adds with float atomics (the deterministic path does not).
//
// Work is cut into units (a chunk of samples of one attribute, cuda/kernels.h): a block leaves
// one partial result per unit, and the block that finishes last (arrive_last) sums the partials
// in unit order and writes the loss. The distribution form's histograms are sums of 2^-64
// fixed-point integers (exact, so their order does not matter).
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace crl {
namespace cuda {
namespace {

#define CRL_PARTNER_MESSAGE "crl_ops: a partner index is outside -1..B-1"

template <typename Acc>
__device__ __forceinline__ Acc not_a_number() {
  return Acc(NAN);
}

// ---- the loss's weight of each attribute's terms (crl::term_weights), by a whole block ------------------

struct TermTotals {
  int64_t first, second, with_terms;
};

// The totals over all attributes that crl::term_weights (common/crl_math.h) starts with,
// reduced by the block (integers: the order does not matter). Every thread gets them.
__device__ TermTotals block_term_totals(Form form, const int64_t* counts, int64_t attributes) {
  int64_t first = 0, second = 0, with_terms = 0;
  for (int64_t j = threadIdx.x; j < attributes; j += blockDim.x) {
    const int64_t* c = counts + 4 * j;
    if (form == Form::Relative) {
      first += c[kTripletsColumn];
      with_terms += c[kTripletsColumn] > 0;
    } else if (form == Form::Absolute) {
      first += c[kPositivesColumn];
      second += c[kNegativesColumn];
      with_terms += c[kPositivesColumn] > 0 || c[kNegativesColumn] > 0;
    } else {
      with_terms += c[kPositivesColumn] > 0 && c[kNegativesColumn] > 0;
    }
  }
  first = block_reduce(first, Sum());
  second = block_reduce(second, Sum());
  with_terms = block_reduce(with_terms, Sum());
  CRL_SHARED(TermTotals, totals);
  if (threadIdx.x == 0) totals = {first, second, with_terms};
  __syncthreads();
  return totals;
}

// Attribute j's weights, with the expressions of crl::term_weights (the same bits).
template <typename Acc>
__device__ void term_weight(Form form, Reduction reduction, const int64_t* c, const TermTotals& totals, Acc& first,
                            Acc& second) {
  const Acc per_attribute = Acc(1) / static_cast<Acc>(totals.with_terms > 0 ? totals.with_terms : 1);
  const auto inverse = [](int64_t n) { return Acc(1) / static_cast<Acc>(n > 0 ? n : 1); };
  first = Acc(0);
  second = Acc(0);
  if (form == Form::Distribution) {
    first = c[kPositivesColumn] > 0 && c[kNegativesColumn] > 0 ? per_attribute : Acc(0);
  } else if (reduction == Reduction::Attribute) {
    if (form == Form::Relative) {
      first = per_attribute * inverse(c[kTripletsColumn]);
    } else {
      first = Acc(0.5) * per_attribute * inverse(c[kPositivesColumn]);
      second = Acc(0.5) * per_attribute * inverse(c[kNegativesColumn]);
    }
  } else if (form == Form::Relative) {
    first = inverse(totals.first);
  } else {
    first = Acc(0.5) * inverse(totals.first);
    second = Acc(0.5) * inverse(totals.second);
  }
}

// loss = sum_j (w_j1 s_j1 + w_j2 s_j2) from the per-attribute sums [A, 2] (written by any block
// before a fence), NaN where the inputs were not finite or a distance overflowed.
template <typename Acc>
__device__ void write_loss(Form form, Reduction reduction, const int64_t* counts, int64_t attributes, const Acc* sums,
                           const bool* finite, const unsigned int* overflow, Acc* loss) {
  const TermTotals totals = block_term_totals(form, counts, attributes);
  Acc total = Acc(0);
  for (int64_t j = threadIdx.x; j < attributes; j += blockDim.x) {
    Acc first, second;
    term_weight(form, reduction, counts + 4 * j, totals, first, second);
    total += first * __ldcg(sums + 2 * j);
    if (form == Form::Absolute) total += second * __ldcg(sums + 2 * j + 1);
  }
  total = block_reduce(total, Sum());
  if (threadIdx.x == 0) {
    const bool ok = (finite == nullptr || *finite) && __ldcg(overflow) == 0;
    *loss = ok ? total : not_a_number<Acc>();
  }
}

// ---- pair distances -------------------------------------------------------------------------------------

template <typename Acc, typename T>
__device__ __forceinline__ Acc feature(const Features<T>& x, int64_t i, int64_t j, int64_t d) {
  return static_cast<Acc>(x.data[i * x.sample_stride + j * x.attribute_stride + d * x.dim_stride]);
}

// d(x_ij, x_pj) as cpu::pair_distances computes it; an infinite squared distance is an
// assertion with validate, else it sets `overflow`.
template <typename Acc, typename T>
__device__ __forceinline__ Acc pair_distance(const Features<T>& x, int64_t i, int64_t p, int64_t j, bool validate,
                                             bool& overflow) {
  const T* a = x.data + i * x.sample_stride + j * x.attribute_stride;
  const T* b = x.data + p * x.sample_stride + j * x.attribute_stride;
  const Acc squared = squared_distance<Acc>(a, x.dim_stride, b, x.dim_stride, x.dim);
  const bool infinite = isinf(squared);
  if (validate) {
    if constexpr (std::is_same<Acc, double>::value) {
      CUDA_KERNEL_ASSERT_MSG(!infinite, CRL_OVERFLOW_MESSAGE("float64"));
    } else {
      CUDA_KERNEL_ASSERT_MSG(!infinite, CRL_OVERFLOW_MESSAGE("float32"));
    }
  }
  overflow |= infinite;
  return distance_from_squared(squared);
}

__device__ __forceinline__ int64_t checked_partner(const int64_t* partners, int64_t at, int64_t batch) {
  const int64_t p = partners[at];
  CUDA_KERNEL_ASSERT_MSG(p >= -1 && p < batch, CRL_PARTNER_MESSAGE);
  return p;
}

// The unit's attribute and sample range.
struct Unit {
  int64_t attribute, begin, end;

  __device__ Unit(const RowTiles& t, int64_t unit)
      : attribute(unit / t.chunks),
        begin((unit % t.chunks) * t.rows_per_chunk),
        end(min(t.batch, begin + t.rows_per_chunk)) {}
};

// ---- forward: distances and the relative and absolute sums, or the distribution's ranges ----------------

// Scratch layout of the forward (one cudaMemsetAsync clears `cleared` bytes from the start):
// relative, absolute: [finished blocks, overflow] counters, then [units, 2] partial sums.
// distribution: [finished attributes, overflow, finished units of each attribute (A)] counters,
// [A, 2] NaN marks, [A] ranges R_j (as bits, for atomicMax), [A, 2, bins, 2] fixed-point histograms.
struct LossLayout {
  size_t counters, nan_marks, longest, fixed, partials, cleared, total;
};

__host__ __device__ inline size_t aligned(size_t bytes) {
  return (bytes + 15) / 16 * 16;
}

__host__ __device__ inline LossLayout loss_layout(Form form, const RowTiles& t, int64_t bins, size_t acc_size) {
  LossLayout l{};
  const size_t attributes = static_cast<size_t>(t.attributes);
  if (form != Form::Distribution) {
    l.partials = aligned(2 * sizeof(unsigned int));
    l.cleared = 2 * sizeof(unsigned int);
    l.total = l.partials + 2 * static_cast<size_t>(t.units()) * acc_size;
    return l;
  }
  l.nan_marks = aligned((2 + attributes) * sizeof(unsigned int));
  l.longest = l.nan_marks + aligned(2 * attributes * sizeof(unsigned int));
  l.fixed = l.longest + aligned(attributes * acc_size);
  l.cleared = l.total = l.fixed + attributes * 2 * static_cast<size_t>(bins) * 2 * sizeof(unsigned long long);
  return l;
}

template <typename T, typename Acc, Form F>
__global__ void __launch_bounds__(kThreads) pair_loss_kernel(LossArgs<T, Acc> args, char* workspace) {
  CRL_SHARED(Acc, tile_d, [kTilePairs]);  // relative: the tile's distances and partners
  CRL_SHARED(int32_t, tile_p, [kTilePairs]);  // B < 2^31
  const RowTiles t = args.tiles;
  const int64_t width = t.width, k = width / 2;
  const LossLayout layout = loss_layout(F, t, args.bins, sizeof(Acc));
  unsigned int* counters = reinterpret_cast<unsigned int*>(workspace);
  bool overflow = false;
  for (int64_t u = blockIdx.x; u < t.units(); u += gridDim.x) {
    const Unit unit(t, u);
    const int64_t j = unit.attribute;
    const Acc margin = F == Form::Relative ? args.margins[j * args.margin_stride] : args.apc_margin;
    Acc first = Acc(0), second = Acc(0);  // relative: hinges; absolute: positive d^2, negative hinge^2; R
    for (int64_t i0 = unit.begin; i0 < unit.end; i0 += t.rows_per_tile) {
      const int64_t pairs = min(t.rows_per_tile, unit.end - i0) * width;
      for (int64_t e = threadIdx.x; e < pairs; e += blockDim.x) {
        const int64_t i = i0 + e / width, m = e % width, at = (i * t.attributes + j) * width + m;
        const int64_t p = checked_partner(args.partners, at, t.batch);
        const Acc d = p >= 0 ? pair_distance<Acc>(args.x, i, p, j, args.validate, overflow) : Acc(0);
        args.distances[at] = d;
        if constexpr (F == Form::Relative) {
          tile_d[e] = d;
          tile_p[e] = static_cast<int32_t>(p);
        } else if (p >= 0) {
          if constexpr (F == Form::Absolute) {
            if (m < k) {
              first += d * d;
            } else {
              const Acc h = hinge(margin - d);
              second += h * h;
            }
          } else if (d > first) {  // the range R_j: NaN (non-finite features) never wins, as std::max
            first = d;
          }
        }
      }
      if constexpr (F == Form::Relative) {  // (row, positive a): its hinges over the row's negatives
        __syncthreads();
        const int64_t items = (pairs / width) * k;
        for (int64_t q = threadIdx.x; q < items; q += blockDim.x) {
          const int64_t row = (q / k) * width, a = row + q % k;
          if (tile_p[a] < 0) continue;
          for (int64_t b = row + k; b < row + width; ++b) {
            if (tile_p[b] >= 0) first += hinge(margin + tile_d[a] - tile_d[b]);
          }
        }
        __syncthreads();
      }
    }
    if constexpr (F == Form::Distribution) {
      first = block_reduce(first, Max());
      if (threadIdx.x == 0 && first > Acc(0)) {  // non-negative floats order as their bits
        Acc* longest = reinterpret_cast<Acc*>(workspace + layout.longest) + j;
        if constexpr (std::is_same<Acc, double>::value) {
          atomicMax(reinterpret_cast<unsigned long long*>(longest),
                    static_cast<unsigned long long>(__double_as_longlong(first)));
        } else {
          atomicMax(reinterpret_cast<unsigned int*>(longest), __float_as_uint(first));
        }
      }
    } else {
      first = block_reduce(first, Sum());
      second = block_reduce(second, Sum());
      if (threadIdx.x == 0) {
        Acc* partial = reinterpret_cast<Acc*>(workspace + layout.partials) + 2 * u;
        partial[0] = first;
        partial[1] = second;
      }
    }
  }
  if (__syncthreads_or(overflow) && threadIdx.x == 0) atomicOr(counters + 1, 1u);
  if constexpr (F != Form::Distribution) {
    if (!arrive_last(counters, gridDim.x)) return;
    // The sums of each attribute's partials in unit order, a warp per attribute.
    const Acc* partials = reinterpret_cast<const Acc*>(workspace + layout.partials);
    const int lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
    for (int64_t j = threadIdx.x / kWarp; j < t.attributes; j += warps) {
      Acc first = Acc(0), second = Acc(0);
      for (int64_t c = lane; c < t.chunks; c += kWarp) {
        first += __ldcg(partials + 2 * (j * t.chunks + c));
        second += __ldcg(partials + 2 * (j * t.chunks + c) + 1);
      }
      first = warp_reduce(first, Sum());
      second = warp_reduce(second, Sum());
      if (lane == 0) {
        args.sums[2 * j] = first;
        args.sums[2 * j + 1] = F == Form::Relative ? Acc(0) : second;
      }
    }
    __threadfence();
    __syncthreads();
    write_loss(F, args.reduction, args.pair_counts, t.attributes, args.sums, args.finite, counters + 1, args.loss);
  }
}

// ---- forward: the distribution form's histograms ------------------------------------------------------------

// A histogram weight v (in [0, 1], or just outside by rounding) as the 128-bit fixed-point
// number hi * 2^64 + lo ~ v * 2^64, to within 2^-53 of v.
__device__ __forceinline__ void to_fixed(double v, unsigned long long& lo, long long& hi) {
  const double whole = floor(v), fraction = v - whole;  // fraction rounds to 1 for a tiny negative v
  hi = static_cast<long long>(whole) + (fraction < 1.0 ? 0 : 1);
  lo = fraction < 1.0 ? __double2ull_rn(ldexp(fraction, 64)) : 0;  // fraction <= 1 - 2^-53: below 2^64
}

// cell[0..1] += (lo, hi), an exact and order-free sum (atomics on global or shared memory).
__device__ __forceinline__ void fixed_add(unsigned long long* cell, unsigned long long lo, long long hi) {
  if (lo != 0) {
    const unsigned long long old = atomicAdd(cell, lo);
    if (old + lo < old) ++hi;  // the fraction word wrapped: carry into the integer word
  }
  if (hi != 0) atomicAdd(cell + 1, static_cast<unsigned long long>(hi));
}

__device__ __forceinline__ double from_fixed(unsigned long long lo, unsigned long long hi) {
  return static_cast<double>(static_cast<long long>(hi)) + ldexp(static_cast<double>(lo), -64);
}

// Histograms of at most this many nodes are first summed in shared memory by each block.
constexpr int64_t kStagedBins = 512;

template <typename Acc>
struct HistogramArgs {
  const int64_t* partners;
  const Acc* distances;
  RowTiles tiles;
  Reduction reduction;
  int64_t bins;
  const int64_t* pair_counts;
  const bool* finite;
  Acc* sums;
  Acc* histograms;
  Acc* loss;
};

// Normalises attribute j's histograms, writes them and its sums (overlap, scale). One block.
template <typename Acc>
__device__ void finish_attribute(const HistogramArgs<Acc>& args, const LossLayout& layout, char* workspace,
                                 int64_t j, Acc scale) {
  const int64_t bins = args.bins;
  const int64_t* counts = args.pair_counts + 4 * j;
  const int64_t n_pos = counts[kPositivesColumn], n_neg = counts[kNegativesColumn];
  const unsigned long long* fixed = reinterpret_cast<const unsigned long long*>(workspace + layout.fixed) + j * 4 * bins;
  const unsigned int* nan_marks = reinterpret_cast<const unsigned int*>(workspace + layout.nan_marks) + 2 * j;
  Acc* h = args.histograms + j * 2 * bins;  // [positives | negatives]
  for (int64_t q = threadIdx.x; q < 2 * bins; q += blockDim.x) {
    const int64_t kind = q / bins, node = q % bins;
    // A NaN distance (non-finite features, validate=False) lands on nodes 0 and 1, as on the CPU.
    const bool nan = node <= 1 && __ldcg(nan_marks + kind) != 0;
    const Acc value =
        nan ? not_a_number<Acc>() : static_cast<Acc>(from_fixed(__ldcg(fixed + 2 * q), __ldcg(fixed + 2 * q + 1)));
    const int64_t pairs = kind == 0 ? n_pos : n_neg;
    h[q] = value / static_cast<Acc>(pairs > 1 ? pairs : 1);
  }
  __syncthreads();
  // sum_t h+_t * (h-_0 + ... + h-_t): each thread takes a run of nodes; a block scan gives the
  // cumulative sum of h- before its run.
  const int64_t run = (bins + blockDim.x - 1) / blockDim.x;
  const int64_t first = min(bins, threadIdx.x * run), last = min(bins, first + run);
  Acc negatives = Acc(0);
  for (int64_t node = first; node < last; ++node) negatives += h[bins + node];
  Acc all_negatives;
  Acc cumulative = block_exclusive_scan(negatives, all_negatives);
  Acc overlap = Acc(0);
  for (int64_t node = first; node < last; ++node) {
    cumulative += h[bins + node];
    overlap += h[node] * cumulative;
  }
  overlap = block_reduce(overlap, Sum());
  if (threadIdx.x == 0) {
    args.sums[2 * j] = n_pos > 0 && n_neg > 0 ? overlap : Acc(0);
    args.sums[2 * j + 1] = scale;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) histogram_kernel(HistogramArgs<Acc> args, char* workspace) {
  CRL_DYNAMIC_SHARED(unsigned long long, staged);  // [2 * bins][lo, hi] where bins <= kStagedBins
  const RowTiles t = args.tiles;
  const int64_t width = t.width, k = width / 2, bins = args.bins;
  const bool staging = bins <= kStagedBins;
  const LossLayout layout = loss_layout(Form::Distribution, t, bins, sizeof(Acc));
  unsigned int* counters = reinterpret_cast<unsigned int*>(workspace);
  unsigned int* nan_marks = reinterpret_cast<unsigned int*>(workspace + layout.nan_marks);
  const Acc* longest = reinterpret_cast<const Acc*>(workspace + layout.longest);
  unsigned long long* fixed = reinterpret_cast<unsigned long long*>(workspace + layout.fixed);
  for (int64_t u = blockIdx.x; u < t.units(); u += gridDim.x) {
    const Unit unit(t, u);
    const int64_t j = unit.attribute;
    const Acc range = longest[j];
    const Acc scale = range > Acc(0) ? static_cast<Acc>(bins - 1) / range : Acc(0);  // as the CPU
    unsigned long long* target = staging ? staged : fixed + j * 4 * bins;
    if (staging) {
      for (int64_t q = threadIdx.x; q < 4 * bins; q += blockDim.x) staged[q] = 0;
      __syncthreads();
    }
    const int64_t pairs = (unit.end - unit.begin) * width;
    for (int64_t e = threadIdx.x; e < pairs; e += blockDim.x) {
      const int64_t i = unit.begin + e / width, m = e % width, at = (i * t.attributes + j) * width + m;
      if (args.partners[at] < 0) continue;
      const int64_t kind = m >= k;
      int64_t node;
      Acc w;
      histogram_node(args.distances[at], scale, bins, node, w);
      const Acc lower = Acc(1) - w;
      if (lower != lower) {  // NaN: w too
        atomicOr(nan_marks + 2 * j + kind, 1u);
        continue;
      }
      unsigned long long lo;
      long long hi;
      to_fixed(static_cast<double>(lower), lo, hi);
      fixed_add(target + 2 * (kind * bins + node), lo, hi);
      to_fixed(static_cast<double>(w), lo, hi);
      fixed_add(target + 2 * (kind * bins + node + 1), lo, hi);
    }
    if (staging) {
      __syncthreads();
      unsigned long long* global = fixed + j * 4 * bins;
      for (int64_t q = threadIdx.x; q < 2 * bins; q += blockDim.x) {
        const unsigned long long lo = staged[2 * q], hi = staged[2 * q + 1];
        if (lo != 0 || hi != 0) fixed_add(global + 2 * q, lo, static_cast<long long>(hi));
      }
    }
    if (arrive_last(counters + 2 + j, static_cast<unsigned int>(t.chunks))) {
      finish_attribute(args, layout, workspace, j, scale);
      if (arrive_last(counters, static_cast<unsigned int>(t.attributes))) {
        write_loss(Form::Distribution, args.reduction, args.pair_counts, t.attributes, args.sums, args.finite,
                   counters + 1, args.loss);
      }
    }
  }
}

// ---- pair counts -----------------------------------------------------------------------------------------

constexpr int64_t kCountRows = 4 * kThreads;  // rows of one attribute per unit, at least

RowTiles count_tiles(int64_t batch, int64_t attributes) {
  const int64_t rows = std::max(kCountRows, (batch + kMaxChunks - 1) / kMaxChunks);
  return {batch, attributes, 0, rows, rows, std::max<int64_t>(1, (batch + rows - 1) / rows)};
}

__global__ void __launch_bounds__(kThreads)
    pair_counts_kernel(const bool* anchors, const int64_t* partners, RowTiles t, int64_t width, int64_t* counts,
                       char* workspace) {
  const int64_t k = width / 2;
  unsigned int* finished = reinterpret_cast<unsigned int*>(workspace);
  int64_t* partials = reinterpret_cast<int64_t*>(workspace + aligned(t.attributes * sizeof(unsigned int)));
  for (int64_t u = blockIdx.x; u < t.units(); u += gridDim.x) {
    const Unit unit(t, u);
    const int64_t j = unit.attribute;
    int64_t n_anchors = 0, n_pos = 0, n_neg = 0, n_triplets = 0;
    for (int64_t i = unit.begin + threadIdx.x; i < unit.end; i += blockDim.x) {
      const int64_t row = i * t.attributes + j;
      int64_t pos = 0, neg = 0;
      for (int64_t m = 0; m < k; ++m) {
        pos += partners[row * width + m] >= 0;
        neg += partners[row * width + k + m] >= 0;
      }
      n_anchors += anchors[row];
      n_pos += pos;
      n_neg += neg;
      n_triplets += pos * neg;
    }
    n_anchors = block_reduce(n_anchors, Sum());
    n_pos = block_reduce(n_pos, Sum());
    n_neg = block_reduce(n_neg, Sum());
    n_triplets = block_reduce(n_triplets, Sum());
    if (threadIdx.x == 0) {
      int64_t* out = t.chunks == 1 ? counts + 4 * j : partials + 4 * u;
      out[kAnchorsColumn] = n_anchors;
      out[kPositivesColumn] = n_pos;
      out[kNegativesColumn] = n_neg;
      out[kTripletsColumn] = n_triplets;
    }
    if (t.chunks == 1 || !arrive_last(finished + j, static_cast<unsigned int>(t.chunks))) continue;
    if (threadIdx.x < 4) {  // integer sums: any order
      int64_t total = 0;
      for (int64_t c = 0; c < t.chunks; ++c) total += __ldcg(partials + 4 * (j * t.chunks + c) + threadIdx.x);
      counts[4 * j + threadIdx.x] = total;
    }
  }
}

// ---- backward -------------------------------------------------------------------------------------------

// Scratch of the backward, cleared by prepare_backward_kernel: [finished blocks] counter, [A]
// open hinges per attribute (margins gradient), [A, 2] term weights.
struct BackwardLayout {
  size_t open, weights, total;
};

__host__ __device__ inline BackwardLayout backward_layout(int64_t attributes, size_t acc_size) {
  BackwardLayout l{};
  l.open = aligned(sizeof(unsigned int));
  l.weights = l.open + aligned(static_cast<size_t>(attributes) * sizeof(unsigned long long));
  l.total = l.weights + 2 * static_cast<size_t>(attributes) * acc_size;
  return l;
}

// Zeroes (or, after a NaN loss, NaNs) the gradient buffer and the counters; block 0 computes
// the term weights, and the margins gradient where it is not the relative form's sum (zeros or NaN).
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    prepare_backward_kernel(Form form, Reduction reduction, const int64_t* counts, int64_t attributes, const Acc* loss,
                            Acc* gradient, int64_t gradient_size, Acc* grad_margins, char* workspace) {
  const bool nan = isnan(*loss);
  CRL_GRID_STRIDE(e, gradient_size) gradient[e] = nan ? not_a_number<Acc>() : Acc(0);
  if (blockIdx.x != 0) return;
  const BackwardLayout layout = backward_layout(attributes, sizeof(Acc));
  unsigned long long* open = reinterpret_cast<unsigned long long*>(workspace + layout.open);
  Acc* weights = reinterpret_cast<Acc*>(workspace + layout.weights);
  const TermTotals totals = block_term_totals(form, counts, attributes);
  for (int64_t j = threadIdx.x; j < attributes; j += blockDim.x) {
    term_weight(form, reduction, counts + 4 * j, totals, weights[2 * j], weights[2 * j + 1]);
    open[j] = 0;
    if (grad_margins != nullptr && (nan || form != Form::Relative)) grad_margins[j] = nan ? not_a_number<Acc>() : Acc(0);
  }
  if (threadIdx.x == 0) *reinterpret_cast<unsigned int*>(workspace) = 0;
}

// d loss / d distance of the tile's pair e (partner >= 0), as cpu::loss_backward; `open` counts
// the relative form's open hinges (on the positive side, once each).
template <typename T, typename Acc>
__device__ __forceinline__ Acc distance_gradient(const BackwardArgs<T, Acc>& args, const Acc* tile_d,
                                                 const int32_t* tile_p, int64_t e, int64_t j, Acc g, Acc first,
                                                 Acc second, Acc margin, uint64_t& open) {
  const int64_t width = args.tiles.width, k = width / 2, m = e % width, row = e - m;
  const Acc d = tile_d[e];
  if (args.form == Form::Relative) {
    const Acc scale = g * first;
    Acc grad = Acc(0);
    if (m < k) {
      for (int64_t b = row + k; b < row + width; ++b) {
        if (tile_p[b] >= 0 && margin + d - tile_d[b] > Acc(0)) {
          grad += scale;
          ++open;
        }
      }
    } else {
      for (int64_t a = row; a < row + k; ++a) {
        if (tile_p[a] >= 0 && margin + tile_d[a] - d > Acc(0)) grad -= scale;
      }
    }
    return grad;
  }
  if (args.form == Form::Absolute) {
    // d/dd of w * d^2 is 2 w d; of w * hinge(m - d)^2 is -2 w hinge.
    if (m < k) return Acc(2) * g * first * d;
    return -(Acc(2) * g * second) * hinge(args.apc_margin - d);
  }
  const int64_t* counts = args.pair_counts + 4 * j;
  const int64_t n_pos = counts[kPositivesColumn], n_neg = counts[kNegativesColumn];
  if (n_pos == 0 || n_neg == 0) return Acc(0);
  // d overlap / d h+_t = h-_0 + ... + h-_t and d overlap / d h-_t = h+_t + ... + h+_{bins-1}: the
  // difference of two neighbouring nodes is one histogram entry.
  const int64_t bins = args.bins;
  const Acc scale = args.sums[2 * j + 1];
  const Acc* h = args.histograms + j * 2 * bins;
  int64_t node;
  Acc w;
  histogram_node(d, scale, bins, node, w);
  const bool negative = m >= k;
  const Acc factor = g * first / static_cast<Acc>(negative ? n_neg : n_pos);
  const Acc step = negative ? -h[node] : h[bins + node + 1];
  return factor * (step * scale);
}

// The backward over the rows of each unit, tile by tile. Scatter: adds every pair's gradient to
// both ends with float atomics into out [B, A, D] (zeroed by prepare_backward_kernel). Else:
// writes the pairs' scales (d loss / d distance) / distance into out [B, A, W].
template <typename T, typename Acc, bool Scatter>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardArgs<T, Acc> args, char* workspace, Acc* out) {
  CRL_SHARED(Acc, tile_d, [kTilePairs]);
  CRL_SHARED(Acc, tile_s, [kTilePairs]);
  CRL_SHARED(int32_t, tile_p, [kTilePairs]);  // B < 2^31
  CRL_SHARED(bool, row_has_pairs, [kTargetTilePairs]);
  if (isnan(*args.loss)) return;  // prepare_backward_kernel wrote NaN gradients
  const RowTiles t = args.tiles;
  const int64_t width = t.width, dim = args.x.dim;
  const BackwardLayout layout = backward_layout(t.attributes, sizeof(Acc));
  unsigned long long* open_hinges = reinterpret_cast<unsigned long long*>(workspace + layout.open);
  const Acc* weights = reinterpret_cast<const Acc*>(workspace + layout.weights);
  const bool margins = args.grad_margins != nullptr && args.form == Form::Relative;
  const Acc g = *args.grad;
  for (int64_t u = blockIdx.x; u < t.units(); u += gridDim.x) {
    const Unit unit(t, u);
    const int64_t j = unit.attribute;
    const Acc first = weights[2 * j], second = weights[2 * j + 1];
    const Acc margin = args.form == Form::Relative ? args.margins[j * args.margin_stride] : Acc(0);
    uint64_t open = 0;
    for (int64_t i0 = unit.begin; i0 < unit.end; i0 += t.rows_per_tile) {
      const int64_t rows = min(t.rows_per_tile, unit.end - i0), pairs = rows * width;
      for (int64_t e = threadIdx.x; e < pairs; e += blockDim.x) {
        const int64_t at = ((i0 + e / width) * t.attributes + j) * width + e % width;
        tile_p[e] = static_cast<int32_t>(checked_partner(args.partners, at, t.batch));
        tile_d[e] = args.distances[at];
      }
      __syncthreads();
      if constexpr (Scatter) {  // rows without pairs (not anchors) skip the scatter
        for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
          bool any = false;
          for (int64_t e = r * width; e < (r + 1) * width; ++e) any |= tile_p[e] >= 0;
          row_has_pairs[r] = any;
        }
      }
      for (int64_t e = threadIdx.x; e < pairs; e += blockDim.x) {
        const Acc grad =
            tile_p[e] >= 0 ? distance_gradient(args, tile_d, tile_p, e, j, g, first, second, margin, open) : Acc(0);
        const Acc s = distance_gradient_scale(grad, tile_d[e]);
        if constexpr (Scatter) {
          tile_s[e] = s;
        } else {
          out[((i0 + e / width) * t.attributes + j) * width + e % width] = s;
        }
      }
      if constexpr (Scatter) {
        __syncthreads();
        // (row, dimension) items: each pair adds s (x_i - x_p) to its row and subtracts it from its partner's.
        for (int64_t q = threadIdx.x; q < rows * dim; q += blockDim.x) {
          const int64_t r = q / dim, d = q % dim;
          if (!row_has_pairs[r]) continue;
          const int64_t i = i0 + r;
          const Acc xi = feature<Acc>(args.x, i, j, d);
          Acc own = Acc(0);
          for (int64_t e = r * width; e < (r + 1) * width; ++e) {
            const int64_t p = tile_p[e];
            const Acc s = tile_s[e];
            if (p < 0 || s == Acc(0)) continue;
            const Acc step = s * (xi - feature<Acc>(args.x, p, j, d));
            own += step;
            atomicAdd(out + (p * t.attributes + j) * dim + d, -step);
          }
          atomicAdd(out + (i * t.attributes + j) * dim + d, own);
        }
      }
      __syncthreads();
    }
    if (margins) {
      open = block_reduce(open, Sum());
      if (threadIdx.x == 0 && open != 0) atomicAdd(open_hinges + j, static_cast<unsigned long long>(open));
    }
  }
  if (!margins || !arrive_last(reinterpret_cast<unsigned int*>(workspace), gridDim.x)) return;
  // d loss / d m_j: the weight of a hinge times attribute j's open hinges (integer sums: any order).
  for (int64_t j = threadIdx.x; j < t.attributes; j += blockDim.x) {
    args.grad_margins[j] = g * weights[2 * j] * static_cast<Acc>(__ldcg(open_hinges + j));
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(BackwardArgs<T, Acc> args, const Acc* scales, const int64_t* incoming, const int64_t* offsets,
                  T* grad_features) {
  const RowTiles t = args.tiles;
  const int64_t width = t.width, dim = args.x.dim;
  const bool nan = isnan(*args.loss);
  CRL_GRID_STRIDE(e, t.batch * t.attributes * dim) {
    if (nan) {
      grad_features[e] = static_cast<T>(not_a_number<Acc>());
      continue;
    }
    const int64_t d = e % dim, row = e / dim, p = row / t.attributes, j = row % t.attributes;
    const Acc xp = feature<Acc>(args.x, p, j, d);
    Acc total = Acc(0);
    for (int64_t at = row * width; at < (row + 1) * width; ++at) {  // the row's own pairs
      const int64_t q = args.partners[at];
      const Acc s = scales[at];
      if (q < 0 || s == Acc(0)) continue;
      total += s * (xp - feature<Acc>(args.x, q, j, d));
    }
    for (int64_t n = offsets[j * t.batch + p]; n < offsets[j * t.batch + p + 1]; ++n) {  // the pairs ending here
      const int64_t at = incoming[n];
      const Acc s = scales[at];
      if (s == Acc(0)) continue;
      total -= s * (feature<Acc>(args.x, at / (t.attributes * width), j, d) - xp);
    }
    grad_features[e] = static_cast<T>(total);
  }
}

int grid_for(int64_t units) {
  return static_cast<int>(std::max<int64_t>(1, std::min(units, kMaxBlocks)));
}

template <typename T, typename Acc>
void prepare_backward(const BackwardArgs<T, Acc>& args, Acc* gradient, int64_t gradient_size, void* workspace,
                      cudaStream_t stream) {
  CRL_LAUNCH(blocks_for(gradient_size), kThreads, 0, stream, prepare_backward_kernel<Acc>)(
      args.form, args.reduction, args.pair_counts, args.tiles.attributes, args.loss, gradient, gradient_size,
      args.grad_margins, static_cast<char*>(workspace));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---- launchers --------------------------------------------------------------------------------------------

size_t pair_counts_workspace(int64_t batch, int64_t attributes) {
  const RowTiles t = count_tiles(batch, attributes);
  return t.chunks == 1 ? 0 : aligned(attributes * sizeof(unsigned int)) + 4 * t.units() * sizeof(int64_t);
}

void pair_counts(const bool* anchors, const int64_t* partners, int64_t batch, int64_t attributes, int64_t width,
                 int64_t* counts, void* workspace, cudaStream_t stream) {
  const RowTiles t = count_tiles(batch, attributes);
  if (t.chunks > 1) C10_CUDA_CHECK(cudaMemsetAsync(workspace, 0, attributes * sizeof(unsigned int), stream));
  CRL_LAUNCH(grid_for(t.units()), kThreads, 0, stream, pair_counts_kernel)(anchors, partners, t, width, counts,
                                                                  static_cast<char*>(workspace));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
size_t loss_workspace(Form form, const RowTiles& tiles, int64_t bins) {
  return loss_layout(form, tiles, bins, sizeof(Acc)).total;
}

template <typename T, typename Acc>
void loss(const LossArgs<T, Acc>& args, void* workspace, cudaStream_t stream) {
  const LossLayout layout = loss_layout(args.form, args.tiles, args.bins, sizeof(Acc));
  C10_CUDA_CHECK(cudaMemsetAsync(workspace, 0, layout.cleared, stream));
  char* scratch = static_cast<char*>(workspace);
  const int grid = grid_for(args.tiles.units());
  if (args.form == Form::Relative) {
    CRL_LAUNCH(grid, kThreads, 0, stream, pair_loss_kernel<T, Acc, Form::Relative>)(args, scratch);
  } else if (args.form == Form::Absolute) {
    CRL_LAUNCH(grid, kThreads, 0, stream, pair_loss_kernel<T, Acc, Form::Absolute>)(args, scratch);
  } else {
    CRL_LAUNCH(grid, kThreads, 0, stream, pair_loss_kernel<T, Acc, Form::Distribution>)(args, scratch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const HistogramArgs<Acc> histogram{args.partners, args.distances, args.tiles, args.reduction, args.bins,
                                       args.pair_counts, args.finite, args.sums, args.histograms, args.loss};
    const size_t shared = args.bins <= kStagedBins ? 4 * args.bins * sizeof(unsigned long long) : 0;
    CRL_LAUNCH(grid, kThreads, shared, stream, histogram_kernel<Acc>)(histogram, scratch);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
size_t backward_workspace(const RowTiles& tiles) {
  return backward_layout(tiles.attributes, sizeof(Acc)).total;
}

template <typename T, typename Acc>
void loss_backward_atomic(const BackwardArgs<T, Acc>& args, Acc* grad_features, void* workspace,
                          cudaStream_t stream) {
  const RowTiles& t = args.tiles;
  prepare_backward(args, grad_features, t.batch * t.attributes * args.x.dim, workspace, stream);
  CRL_LAUNCH(grid_for(t.units()), kThreads, 0, stream, backward_kernel<T, Acc, true>)(args, static_cast<char*>(workspace),
                                                                             grad_features);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void loss_backward_scales(const BackwardArgs<T, Acc>& args, Acc* scales, void* workspace, cudaStream_t stream) {
  prepare_backward(args, static_cast<Acc*>(nullptr), 0, workspace, stream);
  CRL_LAUNCH(grid_for(args.tiles.units()), kThreads, 0, stream, backward_kernel<T, Acc, false>)(
      args, static_cast<char*>(workspace), scales);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void loss_backward_gather(const BackwardArgs<T, Acc>& args, const Acc* scales, const int64_t* incoming,
                          const int64_t* offsets, T* grad_features, cudaStream_t stream) {
  const RowTiles& t = args.tiles;
  const int64_t entries = t.batch * t.attributes * args.x.dim;
  if (entries == 0) return;
  CRL_LAUNCH(blocks_for(entries), kThreads, 0, stream, gather_kernel<T, Acc>)(args, scales, incoming, offsets, grad_features);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- crl_ops.distributed's finishing step: one block, a thread per attribute --------------------------------

// The block's threads for `attributes` attributes: whole warps, at most kThreads.
inline int attribute_threads(int64_t attributes) {
  return static_cast<int>(std::min<int64_t>(kThreads, (attributes + kWarp - 1) / kWarp * kWarp));
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    partial_vector_kernel(const Acc* sums, const int64_t* pair_counts, const bool* overflow, const bool* checks,
                          PartialLayout layout, double* partial) {
  CRL_GRID_STRIDE(e, layout.size()) partial[e] = partial_entry(e, layout, sums, pair_counts, overflow, checks);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    shard_loss_kernel(const double* total, PartialLayout layout, Reduction reduction, int64_t world_size,
                      bool validate, int64_t* counts, Acc* weights, Acc* loss, Acc* grad_scale) {
  const int64_t attributes = layout.attributes;
  if (validate && threadIdx.x == 0) {  // the single process's order of the value errors
    const double* flags = total + layout.flags();
    CUDA_KERNEL_ASSERT_MSG(flags[kLogitsFlag] <= 0, CRL_LOGITS_MESSAGE);
    CUDA_KERNEL_ASSERT_MSG(flags[kFeaturesFlag] <= 0, CRL_FEATURES_MESSAGE);
    if (sizeof(Acc) == sizeof(double)) {
      CUDA_KERNEL_ASSERT_MSG(flags[kOverflowFlag] <= 0, CRL_OVERFLOW_MESSAGE("float64"));
    } else {
      CUDA_KERNEL_ASSERT_MSG(flags[kOverflowFlag] <= 0, CRL_OVERFLOW_MESSAGE("float32"));
    }
  }
  Acc* sums = weights + 2 * attributes;
  for (int64_t j = threadIdx.x; j < attributes; j += blockDim.x) partial_counts(total, layout, j, counts);
  __syncthreads();
  if (threadIdx.x == 0) term_weights(layout.form, reduction, counts, attributes, weights);
  for (int64_t j = threadIdx.x; j < attributes; j += blockDim.x) attribute_terms(total, layout, counts, j, sums);
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool failed = partial_failed(total, layout);
    const Acc nan = not_a_number<Acc>();
    *loss = failed ? nan : weighted_terms(layout.form, sums, weights, attributes);
    *grad_scale = failed ? nan : static_cast<Acc>(world_size);
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    shard_loss_backward_kernel(const Acc* grad, const double* total, PartialLayout layout, Reduction reduction,
                               int64_t* counts, Acc* weights, double* out) {
  const int64_t attributes = layout.attributes;
  if (partial_failed(total, layout)) {  // the same for every thread; section 6: every entry NaN
    for (int64_t e = threadIdx.x; e < layout.size(); e += blockDim.x) out[e] = not_a_number<double>();
    return;
  }
  for (int64_t e = layout.sums() + threadIdx.x; e < layout.size(); e += blockDim.x) out[e] = 0.0;
  for (int64_t j = threadIdx.x; j < attributes; j += blockDim.x) partial_counts(total, layout, j, counts);
  __syncthreads();
  if (threadIdx.x == 0) term_weights(layout.form, reduction, counts, attributes, weights);
  __syncthreads();
  const Acc g = *grad;
  for (int64_t j = threadIdx.x; j < attributes; j += blockDim.x) {
    attribute_terms_gradient(g, total, layout, counts, weights, j, out);
  }
}

template <typename Acc>
void partial_vector(const Acc* sums, const int64_t* pair_counts, const bool* overflow, const bool* checks,
                    const PartialLayout& layout, double* partial, cudaStream_t stream) {
  CRL_LAUNCH(blocks_for(layout.size()), kThreads, 0, stream, partial_vector_kernel<Acc>)(sums, pair_counts, overflow,
                                                                                       checks, layout, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void shard_loss(const double* total, const PartialLayout& layout, Reduction reduction, int64_t world_size,
                bool validate, int64_t* pair_counts, Acc* loss, Acc* grad_scale, void* workspace, cudaStream_t stream) {
  CRL_LAUNCH(1, attribute_threads(layout.attributes), 0, stream, shard_loss_kernel<Acc>)(
      total, layout, reduction, world_size, validate, pair_counts, static_cast<Acc*>(workspace), loss, grad_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void shard_loss_backward(const Acc* grad, const double* total, const PartialLayout& layout, Reduction reduction,
                         double* grad_total, void* workspace, cudaStream_t stream) {
  int64_t* counts = static_cast<int64_t*>(workspace);
  Acc* weights = reinterpret_cast<Acc*>(counts + 4 * layout.attributes);
  CRL_LAUNCH(1, attribute_threads(layout.attributes), 0, stream, shard_loss_backward_kernel<Acc>)(
      grad, total, layout, reduction, counts, weights, grad_total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- explicit instantiations ------------------------------------------------------------------------------

#define CRL_INSTANTIATE_ACC(Acc)                                                                               \
  template size_t loss_workspace<Acc>(Form, const RowTiles&, int64_t);                                        \
  template size_t backward_workspace<Acc>(const RowTiles&);                                                   \
  template void partial_vector<Acc>(const Acc*, const int64_t*, const bool*, const bool*, const PartialLayout&,  \
                                    double*, cudaStream_t);                                                   \
  template void shard_loss<Acc>(const double*, const PartialLayout&, Reduction, int64_t, bool, int64_t*, Acc*, \
                                Acc*, void*, cudaStream_t);                                                   \
  template void shard_loss_backward<Acc>(const Acc*, const double*, const PartialLayout&, Reduction, double*,  \
                                         void*, cudaStream_t);

#define CRL_INSTANTIATE_FEATURES(T, Acc)                                                                            \
  template void loss<T, Acc>(const LossArgs<T, Acc>&, void*, cudaStream_t);                                         \
  template void loss_backward_atomic<T, Acc>(const BackwardArgs<T, Acc>&, Acc*, void*, cudaStream_t);              \
  template void loss_backward_scales<T, Acc>(const BackwardArgs<T, Acc>&, Acc*, void*, cudaStream_t);              \
  template void loss_backward_gather<T, Acc>(const BackwardArgs<T, Acc>&, const Acc*, const int64_t*,              \
                                             const int64_t*, T*, cudaStream_t);

CRL_FOR_EACH_ACCUMULATION_TYPE(CRL_INSTANTIATE_ACC)
CRL_FOR_EACH_FEATURE_TYPE(CRL_INSTANTIATE_FEATURES)

}  // namespace cuda
}  // namespace crl
