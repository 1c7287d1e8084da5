// CUDA kernels of the crl_ops ops. Per-element math comes from common/crl_math.h (shared with
// the CPU kernels); this file adds the parallel structure: warp and block merges of top-K
// lists, a tiled fused distance + top-K miner, and deterministic reductions.
//
// Built with --fmad=false so that distances round exactly as on the CPU. Every reduction has a
// fixed order; the only float atomics are in pair_distances_backward_atomic, which the host
// side avoids when torch.use_deterministic_algorithms(True) is on.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common/crl_math.h"
#include "cuda/crl_kernels.h"

namespace crl {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kThreads = 256;

int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535 * 16)));
}

#define CRL_GRID_STRIDE(index, n) \
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < (n); index += int64_t(blockDim.x) * gridDim.x)

// Calls f with a compile-time capacity N >= k (k <= 32) for the register top-K lists.
template <typename F>
void dispatch_capacity(int64_t k, F&& f) {
  if (k <= 1) {
    f(std::integral_constant<int, 1>());
  } else if (k <= 2) {
    f(std::integral_constant<int, 2>());
  } else if (k <= 4) {
    f(std::integral_constant<int, 4>());
  } else if (k <= 8) {
    f(std::integral_constant<int, 8>());
  } else if (k <= 16) {
    f(std::integral_constant<int, 16>());
  } else {
    f(std::integral_constant<int, 32>());
  }
}
constexpr int64_t kMaxRegisterK = 32;

// ---- reductions ---------------------------------------------------------------------------------------

struct Sum {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a > b ? a : b; }
};

// Block-wide reduction in a fixed order (shuffles, then one warp). The result is valid in
// thread 0. blockDim.x must be a multiple of 32.
template <typename V, typename Op>
__device__ V block_reduce(V value, Op op) {
  __shared__ V partial[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // partial may still be read by a previous call
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = op(value, __shfl_down_sync(kFullMask, value, offset));
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / kWarp ? partial[lane] : V(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) value = op(value, __shfl_down_sync(kFullMask, value, offset));
  }
  return value;
}

// ---- merging register top-K lists -----------------------------------------------------------------------

// Takes the k best entries of a warp's lane lists, best first, into out[0..k) (lane 0 writes;
// slots stay untouched when fewer exist). Each candidate is in exactly one lane's list.
template <bool Largest, typename Key, int N, typename Out>
__device__ void warp_merge(FixedTopK<Largest, Key, N>& list, int64_t k, Out* out, Key* out_keys) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = 0; r < k; ++r) {
    Key key = list.keys[0];
    int32_t index = list.index[0];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const Key other_key = __shfl_xor_sync(kFullMask, key, offset);
      const int32_t other = __shfl_xor_sync(kFullMask, index, offset);
      if (ranks_before<Largest>(other_key, other, key, index)) {
        key = other_key;
        index = other;
      }
    }
    if (index == kEmptyIndex) return;  // every lane sees the same winner
    if (list.index[0] == index) list.pop();
    if (lane == 0) {
      out[r] = static_cast<Out>(index);
      if (out_keys != nullptr) out_keys[r] = key;
    }
  }
}

// The k best of all the block's thread lists into out[0..k) (int32).
template <bool Largest, typename Key, int N>
__device__ void block_merge(FixedTopK<Largest, Key, N>& list, int64_t k, int32_t* out) {
  __shared__ Key warp_keys[kWarp][N];
  __shared__ int32_t warp_index[kWarp][N];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane < N) {
    warp_keys[warp][lane] = empty_key<Largest, Key>();
    warp_index[warp][lane] = kEmptyIndex;
  }
  __syncwarp();
  warp_merge(list, k, warp_index[warp], warp_keys[warp]);
  __syncthreads();
  if (warp == 0) {
    FixedTopK<Largest, Key, N> merged;
    merged.clear();
    if (lane < blockDim.x / kWarp) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        merged.keys[i] = warp_keys[lane][i];
        merged.index[i] = warp_index[lane][i];
      }
    }
    warp_merge(merged, k, out, static_cast<Key*>(nullptr));
  }
  __syncthreads();
}

// ---- 1. profiling -----------------------------------------------------------------------------------------

__global__ void profile_kernel(const int64_t* labels, int64_t batch, int64_t attributes, int64_t max_classes,
                               int64_t* counts, bool* minority, bool* active) {
  const int64_t j = blockIdx.x;
  int64_t* h = counts + j * max_classes;
  for (int64_t c = threadIdx.x; c < max_classes; c += blockDim.x) h[c] = 0;  // counts come uninitialised
  __syncthreads();
  int64_t valid = 0;
  for (int64_t i = threadIdx.x; i < batch; i += blockDim.x) {
    const int64_t label = labels[i * attributes + j];
    if (label < 0 || label >= max_classes) continue;  // out-of-range labels are rejected in Python
    atomicAdd(reinterpret_cast<unsigned long long*>(h + label), 1ull);  // integer: order-free
    ++valid;
  }
  valid = block_reduce(valid, Sum());
  __shared__ int64_t n;
  if (threadIdx.x == 0) n = valid;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < max_classes; c += blockDim.x) {
    // The counts of the classes up to c in (count, class) order; c is a minority class when
    // they sum to strictly less than n / 2.
    const int64_t hc = h[c];
    int64_t prefix = 0;
    for (int64_t other = 0; other < max_classes; ++other) {
      const int64_t ho = h[other];
      if (ho < hc || (ho == hc && other <= c)) prefix += ho;
    }
    const bool is_minority = 2 * prefix < n;
    minority[j * max_classes + c] = is_minority;
    active[j * max_classes + c] = is_minority && hc >= 2;
  }
}

// ---- 2. mining ---------------------------------------------------------------------------------------------

template <typename Score, int N>
__global__ void class_lists_kernel(const Score* scores, const int64_t* labels, const bool* active, int64_t batch,
                                   int64_t attributes, int64_t max_classes, int64_t k, int32_t* hard_pos,
                                   int32_t* hard_neg) {
  const int64_t jc = blockIdx.x;
  if (!active[jc]) return;  // only the lists of active classes are read
  for (int64_t m = threadIdx.x; m < k; m += blockDim.x) {  // slots the merge leaves stay empty
    hard_pos[jc * k + m] = kEmpty;
    hard_neg[jc * k + m] = kEmpty;
  }
  const int64_t j = jc / max_classes, c = jc % max_classes;
  FixedTopK<false, Score, N> pos;  // lowest p(c) within class c
  FixedTopK<true, Score, N> neg;   // highest p(c) elsewhere
  pos.clear();
  neg.clear();
  for (int64_t i = threadIdx.x; i < batch; i += blockDim.x) {
    const int64_t label = labels[i * attributes + j];
    if (label < 0) continue;
    const Score key = scores[(i * attributes + j) * max_classes + c];
    if (label == c) {
      pos.offer(key, static_cast<int32_t>(i));
    } else {
      neg.offer(key, static_cast<int32_t>(i));
    }
  }
  block_merge(pos, k, hard_pos + jc * k);
  block_merge(neg, k, hard_neg + jc * k);
}

// K > 32: one thread per (attribute, class), lists in global memory.
template <typename Score>
__global__ void class_lists_large_k_kernel(const Score* scores, const int64_t* labels, const bool* active,
                                           int64_t batch, int64_t attributes, int64_t max_classes, int64_t k,
                                           int32_t* hard_pos, int32_t* hard_neg, Score* keys) {
  const int64_t lists = attributes * max_classes;
  CRL_GRID_STRIDE(jc, lists) {
    if (!active[jc]) continue;
    for (int64_t m = 0; m < k; ++m) hard_pos[jc * k + m] = hard_neg[jc * k + m] = kEmpty;
    const int64_t j = jc / max_classes, c = jc % max_classes;
    int64_t n_pos = 0, n_neg = 0;
    for (int64_t i = 0; i < batch; ++i) {
      const int64_t label = labels[i * attributes + j];
      if (label < 0) continue;
      const Score key = scores[(i * attributes + j) * max_classes + c];
      if (label == c) {
        offer_dynamic<false>(keys + jc * k, hard_pos + jc * k, n_pos, k, key, static_cast<int32_t>(i));
      } else {
        offer_dynamic<true>(keys + (lists + jc) * k, hard_neg + jc * k, n_neg, k, key, static_cast<int32_t>(i));
      }
    }
  }
}

__global__ void class_rows_kernel(const int64_t* labels, const bool* active, int64_t batch, int64_t attributes,
                                  int64_t max_classes, int64_t k, const int32_t* hard_pos, const int32_t* hard_neg,
                                  bool* anchors, int64_t* partners) {
  CRL_GRID_STRIDE(row, batch * attributes) {  // every row: the outputs come uninitialised
    const int64_t i = row / attributes, j = row % attributes;
    int64_t label;
    anchors[row] = is_anchor(labels, active, attributes, max_classes, i, j, label);
    if (anchors[row]) {
      const int64_t list = (j * max_classes + label) * k;
      write_class_row(hard_pos + list, hard_neg + list, k, i, partners + row * 2 * k);
    } else {
      for (int64_t m = 0; m < 2 * k; ++m) partners[row * 2 * k + m] = kEmpty;
    }
  }
}

// Anchors of each attribute in sample order: anchor_list[j, 0..count_j); also the whole anchors
// mask and the (empty) partner rows of the non-anchors, as the outputs come uninitialised.
__global__ void compact_anchors_kernel(const int64_t* labels, const bool* active, int64_t batch, int64_t attributes,
                                       int64_t max_classes, int64_t k, int32_t* anchor_list, int32_t* anchor_count,
                                       bool* anchors, int64_t* partners) {
  __shared__ int32_t offsets[1024];
  const int64_t j = blockIdx.x;
  const int64_t chunk = (batch + blockDim.x - 1) / blockDim.x;
  const int64_t begin = threadIdx.x * chunk, end = min(batch, begin + chunk);
  int32_t count = 0;
  int64_t label;
  for (int64_t i = begin; i < end; ++i) count += is_anchor(labels, active, attributes, max_classes, i, j, label);
  offsets[threadIdx.x] = count;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive scan of 1024 counts
    int32_t total = 0;
    for (int t = 0; t < blockDim.x; ++t) {
      const int32_t c = offsets[t];
      offsets[t] = total;
      total += c;
    }
    anchor_count[j] = total;
  }
  __syncthreads();
  int32_t slot = offsets[threadIdx.x];
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row = i * attributes + j;
    anchors[row] = is_anchor(labels, active, attributes, max_classes, i, j, label);
    if (anchors[row]) {
      anchor_list[j * batch + slot++] = static_cast<int32_t>(i);
    } else {
      for (int64_t m = 0; m < 2 * k; ++m) partners[row * 2 * k + m] = kEmpty;
    }
  }
}

constexpr int kAnchorsPerBlock = 8;  // one warp per anchor
constexpr int kTileCandidates = 128;  // candidates per shared-memory tile, 4 per lane
constexpr int kTileDims = 32;         // feature dimensions per tile

// Fused distances + top-K: a block mines 8 anchors of one attribute; candidate features pass
// through shared memory in [32 dims x 128 samples] tiles; each lane keeps the K farthest
// misclassified positives and the K nearest negatives among its candidates in registers;
// a warp merge gives the anchor's rows. No distance matrix is ever stored.
template <typename Acc, int N>
__global__ void __launch_bounds__(kAnchorsPerBlock * kWarp)
    instance_kernel(const Acc* columns, const int64_t* predictions, const int64_t* labels, int64_t batch,
                    int64_t attributes, int64_t dim, int64_t k, const int32_t* anchor_list,
                    const int32_t* anchor_count, int64_t* partners) {
  const int64_t j = blockIdx.y;
  const int64_t first = int64_t(blockIdx.x) * kAnchorsPerBlock;
  if (first >= anchor_count[j]) return;
  __shared__ Acc tile[kTileDims][kTileCandidates];
  __shared__ Acc anchor_tile[kAnchorsPerBlock][kTileDims];
  __shared__ int64_t tile_labels[kTileCandidates], tile_predictions[kTileCandidates];
  __shared__ int32_t block_anchors[kAnchorsPerBlock];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const bool has_anchor = first + warp < anchor_count[j];
  const int32_t a = has_anchor ? anchor_list[j * batch + first + warp] : 0;
  const int64_t label = labels[int64_t(a) * attributes + j];
  if (lane == 0) block_anchors[warp] = has_anchor ? a : -1;
  const Acc* xj = columns + j * dim * batch;
  FixedTopK<true, Acc, N> pos;
  FixedTopK<false, Acc, N> neg;
  pos.clear();
  neg.clear();
  constexpr int kPerLane = kTileCandidates / kWarp;

  for (int64_t b0 = 0; b0 < batch; b0 += kTileCandidates) {
    Acc squared[kPerLane];
#pragma unroll
    for (int q = 0; q < kPerLane; ++q) squared[q] = Acc(0);
    for (int64_t d0 = 0; d0 < dim; d0 += kTileDims) {
      const int dims = static_cast<int>(min(int64_t(kTileDims), dim - d0));
      __syncthreads();  // the previous tile is consumed
      for (int e = threadIdx.x; e < kTileDims * kTileCandidates; e += blockDim.x) {
        const int dd = e / kTileCandidates, t = e % kTileCandidates;
        tile[dd][t] = dd < dims && b0 + t < batch ? xj[(d0 + dd) * batch + b0 + t] : Acc(0);
      }
      for (int e = threadIdx.x; e < kAnchorsPerBlock * kTileDims; e += blockDim.x) {
        const int w = e / kTileDims, dd = e % kTileDims;
        anchor_tile[w][dd] = block_anchors[w] >= 0 && dd < dims ? xj[(d0 + dd) * batch + block_anchors[w]] : Acc(0);
      }
      if (d0 == 0) {
        for (int t = threadIdx.x; t < kTileCandidates; t += blockDim.x) {
          const int64_t b = b0 + t;
          tile_labels[t] = b < batch ? labels[b * attributes + j] : kEmpty;
          tile_predictions[t] = b < batch ? predictions[b * attributes + j] : kEmpty;
        }
      }
      __syncthreads();
      for (int dd = 0; dd < dims; ++dd) {  // dimensions in order: rounds as the CPU kernel does
        const Acc xa = anchor_tile[warp][dd];
#pragma unroll
        for (int q = 0; q < kPerLane; ++q) accumulate_squared(squared[q], xa, tile[dd][lane + kWarp * q]);
      }
    }
    if (has_anchor) {
#pragma unroll
      for (int q = 0; q < kPerLane; ++q) {
        const int t = lane + kWarp * q;
        const int64_t b = b0 + t;
        const int64_t other = tile_labels[t];
        if (b >= batch || b == a || other < 0) continue;
        if (other != label) {
          neg.offer(squared[q], static_cast<int32_t>(b));
        } else if (tile_predictions[t] != label) {
          pos.offer(squared[q], static_cast<int32_t>(b));
        }
      }
    }
  }
  if (has_anchor) {
    int64_t* row = partners + (int64_t(a) * attributes + j) * 2 * k;
    if (lane == 0) {  // the merges (lane 0) fill what they find; the rest stays empty
      for (int64_t m = 0; m < 2 * k; ++m) row[m] = kEmpty;
    }
    warp_merge(pos, k, row, static_cast<Acc*>(nullptr));
    warp_merge(neg, k, row + k, static_cast<Acc*>(nullptr));
  }
}

// K > 32: one thread per anchor, lists in global memory.
template <typename Acc>
__global__ void instance_large_k_kernel(const Acc* columns, const int64_t* predictions, const int64_t* labels,
                                        int64_t batch, int64_t attributes, int64_t dim, int64_t k,
                                        const int32_t* anchor_list, const int32_t* anchor_count, Acc* keys,
                                        int32_t* index, int64_t* partners) {
  CRL_GRID_STRIDE(r, attributes * batch) {
    const int64_t j = r / batch, slot = r % batch;
    if (slot >= anchor_count[j]) continue;
    const int64_t a = anchor_list[j * batch + slot];
    const int64_t label = labels[a * attributes + j];
    const Acc* xj = columns + j * dim * batch;
    Acc* pos_keys = keys + 2 * r * k;
    Acc* neg_keys = pos_keys + k;
    int32_t* pos = index + 2 * r * k;
    int32_t* neg = pos + k;
    int64_t n_pos = 0, n_neg = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t other = labels[b * attributes + j];
      if (b == a || other < 0) continue;
      const Acc squared = squared_distance<Acc>(xj + a, batch, xj + b, batch, dim);
      if (other != label) {
        offer_dynamic<false>(neg_keys, neg, n_neg, k, squared, static_cast<int32_t>(b));
      } else if (predictions[b * attributes + j] != label) {
        offer_dynamic<true>(pos_keys, pos, n_pos, k, squared, static_cast<int32_t>(b));
      }
    }
    int64_t* row = partners + (a * attributes + j) * 2 * k;
    for (int64_t m = 0; m < k; ++m) {
      row[m] = m < n_pos ? pos[m] : kEmpty;
      row[k + m] = m < n_neg ? neg[m] : kEmpty;
    }
  }
}

// ---- 3. pair distances ---------------------------------------------------------------------------------

template <typename T, typename Acc>
__global__ void pair_distances_kernel(const T* x, Strides s, const int64_t* partners, int64_t batch,
                                      int64_t attributes, int64_t dim, int64_t width, Acc* out) {
  CRL_GRID_STRIDE(e, batch * attributes * width) {
    const int64_t row = e / width, i = row / attributes, j = row % attributes;
    const int64_t p = partners[e];
    if (p < 0 || p >= batch) {  // the CPU kernel rejects p >= B; here it counts as empty
      out[e] = Acc(0);
      continue;
    }
    out[e] = distance_from_squared(
        squared_distance<Acc>(x + i * s.sample + j * s.attribute, s.dim, x + p * s.sample + j * s.attribute, s.dim, dim));
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ Acc feature(const T* x, Strides s, int64_t i, int64_t j, int64_t d) {
  return static_cast<Acc>(x[i * s.sample + j * s.attribute + d * s.dim]);
}

template <typename T, typename Acc>
__global__ void pair_distances_backward_atomic_kernel(const Acc* grad, const T* x, Strides s,
                                                      const int64_t* partners, const Acc* distances, int64_t batch,
                                                      int64_t attributes, int64_t dim, int64_t width, Acc* gx) {
  CRL_GRID_STRIDE(e, batch * attributes * dim) {
    const int64_t row = e / dim, d = e % dim, i = row / attributes, j = row % attributes;
    const Acc xi = feature<T, Acc>(x, s, i, j, d);
    Acc own = Acc(0);
    for (int64_t m = 0; m < width; ++m) {
      const int64_t pe = row * width + m, p = partners[pe];
      if (p < 0 || p >= batch) continue;
      const Acc scale = distance_gradient_scale(grad[pe], distances[pe]);
      if (scale == Acc(0)) continue;
      const Acc diff = xi - feature<T, Acc>(x, s, p, j, d);
      own += scale * diff;
      atomicAdd(gx + (p * attributes + j) * dim + d, -scale * diff);
    }
    atomicAdd(gx + e, own);
  }
}

template <typename T, typename Acc>
__global__ void pair_distances_backward_sorted_kernel(const Acc* grad, const T* x, Strides s,
                                                      const int64_t* partners, const Acc* distances,
                                                      const int64_t* incoming, const int64_t* offsets, int64_t batch,
                                                      int64_t attributes, int64_t dim, int64_t width, Acc* gx) {
  CRL_GRID_STRIDE(e, batch * attributes * dim) {
    const int64_t row = e / dim, d = e % dim, p = row / attributes, j = row % attributes;
    const Acc xp = feature<T, Acc>(x, s, p, j, d);
    Acc total = Acc(0);
    for (int64_t m = 0; m < width; ++m) {  // the row's own pairs
      const int64_t pe = row * width + m, q = partners[pe];
      if (q < 0 || q >= batch) continue;
      total += distance_gradient_scale(grad[pe], distances[pe]) * (xp - feature<T, Acc>(x, s, q, j, d));
    }
    for (int64_t t = offsets[j * batch + p]; t < offsets[j * batch + p + 1]; ++t) {  // pairs ending here
      const int64_t pe = incoming[t], i = pe / width / attributes;
      total -= distance_gradient_scale(grad[pe], distances[pe]) * (feature<T, Acc>(x, s, i, j, d) - xp);
    }
    gx[e] = total;
  }
}

// ---- 4. the loss forms -------------------------------------------------------------------------------------

constexpr int kReduceThreads = 1024;  // one block: a fixed reduction order

template <typename Acc>
__global__ void relative_loss_kernel(const Acc* distances, const int64_t* partners, const Acc* margins, int64_t rows,
                                     int64_t attributes, int64_t width, Acc* loss, int64_t* num_triplets) {
  Acc sum = Acc(0);
  int64_t triplets = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    relative_row(distances + r * width, partners + r * width, width / 2, margins[r % attributes], sum, triplets);
  }
  sum = block_reduce(sum, Sum());
  triplets = block_reduce(triplets, Sum());
  if (threadIdx.x == 0) {
    *loss = sum / static_cast<Acc>(triplets > 0 ? triplets : 1);
    *num_triplets = triplets;
  }
}

template <typename Acc>
__global__ void relative_loss_backward_kernel(const Acc* grad, const Acc* distances, const int64_t* partners,
                                              const Acc* margins, const int64_t* num_triplets, int64_t rows,
                                              int64_t attributes, int64_t width, Acc* out) {
  const Acc scale = *grad / static_cast<Acc>(*num_triplets > 0 ? *num_triplets : 1);
  CRL_GRID_STRIDE(r, rows) {
    relative_row_backward(distances + r * width, partners + r * width, width / 2, margins[r % attributes], scale,
                          out + r * width);
  }
}

template <typename Acc>
__global__ void absolute_loss_kernel(const Acc* distances, const int64_t* partners, Acc margin, int64_t rows,
                                     int64_t width, Acc* loss, int64_t* num_pairs) {
  Acc pos = Acc(0), neg = Acc(0);
  int64_t n_pos = 0, n_neg = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    absolute_row(distances + r * width, partners + r * width, width / 2, margin, pos, neg, n_pos, n_neg);
  }
  pos = block_reduce(pos, Sum());
  neg = block_reduce(neg, Sum());
  n_pos = block_reduce(n_pos, Sum());
  n_neg = block_reduce(n_neg, Sum());
  if (threadIdx.x == 0) {
    *loss = Acc(0.5) * (pos / static_cast<Acc>(n_pos > 0 ? n_pos : 1) + neg / static_cast<Acc>(n_neg > 0 ? n_neg : 1));
    num_pairs[0] = n_pos;
    num_pairs[1] = n_neg;
  }
}

template <typename Acc>
__global__ void absolute_loss_backward_kernel(const Acc* grad, const Acc* distances, const int64_t* partners,
                                              Acc margin, const int64_t* num_pairs, int64_t rows, int64_t width,
                                              Acc* out) {
  const Acc pos_scale = *grad / static_cast<Acc>(num_pairs[0] > 0 ? num_pairs[0] : 1);
  const Acc neg_scale = *grad / static_cast<Acc>(num_pairs[1] > 0 ? num_pairs[1] : 1);
  CRL_GRID_STRIDE(r, rows) {
    absolute_row_backward(distances + r * width, partners + r * width, width / 2, margin, pos_scale, neg_scale,
                          out + r * width);
  }
}

// One block per attribute: range, pair counts, then the two histograms. Each thread owns
// histogram entries and adds the staged pairs in pair order, so no atomics are needed.
template <typename Acc>
__global__ void histogram_kernel(const Acc* distances, const int64_t* partners, int64_t batch, int64_t attributes,
                                 int64_t width, int64_t bins, Acc* histograms, Acc* scale, int64_t* pair_counts,
                                 Acc* per_attribute) {
  const int64_t j = blockIdx.x, k = width / 2, pairs = batch * width;
  Acc* h = histograms + j * 2 * bins;  // [positive bins | negative bins]
  // Each thread owns the entries entry = threadIdx.x + n * blockDim.x in every loop over h below.
  for (int64_t entry = threadIdx.x; entry < 2 * bins; entry += blockDim.x) h[entry] = Acc(0);
  Acc longest = Acc(0);
  int64_t n_pos = 0, n_neg = 0;
  for (int64_t e = threadIdx.x; e < pairs; e += blockDim.x) {
    const int64_t at = ((e / width) * attributes + j) * width + e % width;
    if (partners[at] < 0) continue;
    longest = max(longest, distances[at]);
    (e % width < k ? n_pos : n_neg) += 1;
  }
  longest = block_reduce(longest, Max());
  n_pos = block_reduce(n_pos, Sum());
  n_neg = block_reduce(n_neg, Sum());
  __shared__ Acc attribute_scale;
  __shared__ int64_t counts[2];
  if (threadIdx.x == 0) {
    attribute_scale = longest > Acc(0) ? static_cast<Acc>(bins - 1) / longest : Acc(0);
    scale[j] = attribute_scale;
    counts[0] = pair_counts[2 * j] = n_pos;
    counts[1] = pair_counts[2 * j + 1] = n_neg;
  }
  __shared__ int32_t stage_node[kThreads];
  __shared__ Acc stage_weight[kThreads];
  __shared__ int8_t stage_kind[kThreads];  // 0 positive, 1 negative, -1 no pair
  for (int64_t base = 0; base < pairs; base += blockDim.x) {
    __syncthreads();
    const int64_t e = base + threadIdx.x;
    stage_kind[threadIdx.x] = -1;
    if (e < pairs) {
      const int64_t at = ((e / width) * attributes + j) * width + e % width;
      if (partners[at] >= 0) {
        int64_t node;
        Acc weight;
        histogram_node(distances[at], attribute_scale, bins, node, weight);
        stage_node[threadIdx.x] = static_cast<int32_t>(node);
        stage_weight[threadIdx.x] = weight;
        stage_kind[threadIdx.x] = e % width < k ? 0 : 1;
      }
    }
    __syncthreads();
    const int staged = static_cast<int>(min(int64_t(blockDim.x), pairs - base));
    for (int64_t entry = threadIdx.x; entry < 2 * bins; entry += blockDim.x) {
      const int kind = static_cast<int>(entry / bins);
      const int32_t node = static_cast<int32_t>(entry % bins);
      Acc added = Acc(0);
      for (int q = 0; q < staged; ++q) {
        if (stage_kind[q] != kind) continue;
        if (stage_node[q] == node) added += Acc(1) - stage_weight[q];
        if (stage_node[q] + 1 == node) added += stage_weight[q];
      }
      h[entry] += added;
    }
  }
  __syncthreads();
  for (int64_t entry = threadIdx.x; entry < 2 * bins; entry += blockDim.x) {
    const int64_t n = counts[entry / bins];
    h[entry] /= static_cast<Acc>(n > 0 ? n : 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) per_attribute[j] = histogram_overlap(h, h + bins, bins);
}

template <typename Acc>
__global__ void histogram_mean_kernel(const Acc* per_attribute, const int64_t* pair_counts, int64_t attributes,
                                      Acc* loss) {
  Acc total = Acc(0);
  int64_t counted = 0;
  for (int64_t j = 0; j < attributes; ++j) {
    if (pair_counts[2 * j] > 0 && pair_counts[2 * j + 1] > 0) {
      total += per_attribute[j];
      ++counted;
    }
  }
  *loss = total / static_cast<Acc>(counted > 0 ? counted : 1);
}

template <typename Acc>
__global__ void histogram_backward_kernel(const Acc* grad, const Acc* distances, const int64_t* partners,
                                          int64_t batch, int64_t attributes, int64_t width, int64_t bins,
                                          const Acc* histograms, const Acc* scale, const int64_t* pair_counts,
                                          Acc* gradients, Acc* out) {
  const int64_t j = blockIdx.x, k = width / 2;
  if (pair_counts[2 * j] == 0 || pair_counts[2 * j + 1] == 0) {  // an attribute outside the mean
    for (int64_t e = threadIdx.x; e < batch * width; e += blockDim.x) {
      out[((e / width) * attributes + j) * width + e % width] = Acc(0);
    }
    return;
  }
  __shared__ int64_t counted;
  Acc* g = gradients + j * 2 * bins;  // [d/dh+ | d/dh-]
  if (threadIdx.x == 0) {
    counted = 0;
    for (int64_t a = 0; a < attributes; ++a) counted += pair_counts[2 * a] > 0 && pair_counts[2 * a + 1] > 0;
    histogram_overlap_gradient(histograms + j * 2 * bins, histograms + j * 2 * bins + bins, bins, g, g + bins);
  }
  __syncthreads();
  const Acc base = *grad / static_cast<Acc>(counted);
  const Acc factor[2] = {base / static_cast<Acc>(pair_counts[2 * j]), base / static_cast<Acc>(pair_counts[2 * j + 1])};
  for (int64_t e = threadIdx.x; e < batch * width; e += blockDim.x) {
    const int64_t m = e % width, at = ((e / width) * attributes + j) * width + m;
    if (partners[at] < 0) {
      out[at] = Acc(0);
      continue;
    }
    const int kind = m < k ? 0 : 1;
    out[at] = factor[kind] * histogram_pair_gradient(distances[at], scale[j], bins, g + kind * bins);
  }
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------------------------

void profile(const int64_t* labels, int64_t batch, int64_t attributes, int64_t max_classes, int64_t* counts,
             bool* minority, bool* active, cudaStream_t stream) {
  profile_kernel<<<attributes, kThreads, 0, stream>>>(labels, batch, attributes, max_classes, counts, minority, active);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Score>
void mine_class(const Score* scores, const int64_t* labels, const bool* active, int64_t batch, int64_t attributes,
                int64_t max_classes, int64_t k, int32_t* hard_pos, int32_t* hard_neg, Score* key_scratch,
                bool* anchors, int64_t* partners, cudaStream_t stream) {
  const int64_t lists = attributes * max_classes;
  if (k <= kMaxRegisterK) {
    dispatch_capacity(k, [&](auto capacity) {
      class_lists_kernel<Score, decltype(capacity)::value><<<lists, 128, 0, stream>>>(
          scores, labels, active, batch, attributes, max_classes, k, hard_pos, hard_neg);
    });
  } else {
    class_lists_large_k_kernel<Score><<<blocks_for(lists, 64), 64, 0, stream>>>(
        scores, labels, active, batch, attributes, max_classes, k, hard_pos, hard_neg, key_scratch);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  class_rows_kernel<<<blocks_for(batch * attributes), kThreads, 0, stream>>>(
      labels, active, batch, attributes, max_classes, k, hard_pos, hard_neg, anchors, partners);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void mine_instance(const Acc* columns, const int64_t* predictions, const int64_t* labels, const bool* active,
                   int64_t batch, int64_t attributes, int64_t dim, int64_t max_classes, int64_t k,
                   int32_t* anchor_list, int32_t* anchor_count, Acc* key_scratch, int32_t* index_scratch,
                   bool* anchors, int64_t* partners, cudaStream_t stream) {
  compact_anchors_kernel<<<attributes, 1024, 0, stream>>>(labels, active, batch, attributes, max_classes, k,
                                                          anchor_list, anchor_count, anchors, partners);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (k <= kMaxRegisterK) {
    const dim3 grid((batch + kAnchorsPerBlock - 1) / kAnchorsPerBlock, attributes);
    dispatch_capacity(k, [&](auto capacity) {
      instance_kernel<Acc, decltype(capacity)::value><<<grid, kAnchorsPerBlock * kWarp, 0, stream>>>(
          columns, predictions, labels, batch, attributes, dim, k, anchor_list, anchor_count, partners);
    });
  } else {
    instance_large_k_kernel<Acc><<<blocks_for(attributes * batch, 64), 64, 0, stream>>>(
        columns, predictions, labels, batch, attributes, dim, k, anchor_list, anchor_count, key_scratch,
        index_scratch, partners);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void pair_distances(const T* features, Strides strides, const int64_t* partners, int64_t batch, int64_t attributes,
                    int64_t dim, int64_t width, Acc* distances, cudaStream_t stream) {
  pair_distances_kernel<<<blocks_for(batch * attributes * width), kThreads, 0, stream>>>(
      features, strides, partners, batch, attributes, dim, width, distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void pair_distances_backward_atomic(const Acc* grad, const T* features, Strides strides, const int64_t* partners,
                                    const Acc* distances, int64_t batch, int64_t attributes, int64_t dim,
                                    int64_t width, Acc* grad_features, cudaStream_t stream) {
  pair_distances_backward_atomic_kernel<<<blocks_for(batch * attributes * dim), kThreads, 0, stream>>>(
      grad, features, strides, partners, distances, batch, attributes, dim, width, grad_features);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void pair_distances_backward_sorted(const Acc* grad, const T* features, Strides strides, const int64_t* partners,
                                    const Acc* distances, const int64_t* incoming, const int64_t* offsets,
                                    int64_t batch, int64_t attributes, int64_t dim, int64_t width, Acc* grad_features,
                                    cudaStream_t stream) {
  pair_distances_backward_sorted_kernel<<<blocks_for(batch * attributes * dim), kThreads, 0, stream>>>(
      grad, features, strides, partners, distances, incoming, offsets, batch, attributes, dim, width, grad_features);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void relative_loss(const Acc* distances, const int64_t* partners, const Acc* margins, int64_t rows,
                   int64_t attributes, int64_t width, Acc* loss, int64_t* num_triplets, cudaStream_t stream) {
  relative_loss_kernel<<<1, kReduceThreads, 0, stream>>>(distances, partners, margins, rows, attributes, width, loss,
                                                         num_triplets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void relative_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, const Acc* margins,
                            const int64_t* num_triplets, int64_t rows, int64_t attributes, int64_t width,
                            Acc* grad_distances, cudaStream_t stream) {
  relative_loss_backward_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(
      grad, distances, partners, margins, num_triplets, rows, attributes, width, grad_distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void absolute_loss(const Acc* distances, const int64_t* partners, Acc margin, int64_t rows, int64_t width, Acc* loss,
                   int64_t* num_pairs, cudaStream_t stream) {
  absolute_loss_kernel<<<1, kReduceThreads, 0, stream>>>(distances, partners, margin, rows, width, loss, num_pairs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void absolute_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, Acc margin,
                            const int64_t* num_pairs, int64_t rows, int64_t width, Acc* grad_distances,
                            cudaStream_t stream) {
  absolute_loss_backward_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(grad, distances, partners, margin,
                                                                          num_pairs, rows, width, grad_distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void distribution_loss(const Acc* distances, const int64_t* partners, int64_t batch, int64_t attributes,
                       int64_t width, int64_t bins, Acc* loss, Acc* histograms, Acc* scale, int64_t* pair_counts,
                       Acc* per_attribute, cudaStream_t stream) {
  histogram_kernel<<<attributes, kThreads, 0, stream>>>(distances, partners, batch, attributes, width, bins,
                                                       histograms, scale, pair_counts, per_attribute);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  histogram_mean_kernel<<<1, 1, 0, stream>>>(per_attribute, pair_counts, attributes, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void distribution_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, int64_t batch,
                                int64_t attributes, int64_t width, int64_t bins, const Acc* histograms,
                                const Acc* scale, const int64_t* pair_counts, Acc* gradients, Acc* grad_distances,
                                cudaStream_t stream) {
  histogram_backward_kernel<<<attributes, kThreads, 0, stream>>>(grad, distances, partners, batch, attributes, width,
                                                                bins, histograms, scale, pair_counts, gradients,
                                                                grad_distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- explicit instantiations ------------------------------------------------------------------------------

#define CRL_INSTANTIATE_ACC(Acc)                                                                                      \
  template void mine_class<Acc>(const Acc*, const int64_t*, const bool*, int64_t, int64_t, int64_t, int64_t,       \
                                int32_t*, int32_t*, Acc*, bool*, int64_t*, cudaStream_t);                            \
  template void mine_instance<Acc>(const Acc*, const int64_t*, const int64_t*, const bool*, int64_t, int64_t,      \
                                   int64_t, int64_t, int64_t, int32_t*, int32_t*, Acc*, int32_t*, bool*, int64_t*, \
                                   cudaStream_t);                                                                    \
  template void relative_loss<Acc>(const Acc*, const int64_t*, const Acc*, int64_t, int64_t, int64_t, Acc*,        \
                                   int64_t*, cudaStream_t);                                                          \
  template void relative_loss_backward<Acc>(const Acc*, const Acc*, const int64_t*, const Acc*, const int64_t*,    \
                                            int64_t, int64_t, int64_t, Acc*, cudaStream_t);                          \
  template void absolute_loss<Acc>(const Acc*, const int64_t*, Acc, int64_t, int64_t, Acc*, int64_t*,              \
                                   cudaStream_t);                                                                    \
  template void absolute_loss_backward<Acc>(const Acc*, const Acc*, const int64_t*, Acc, const int64_t*, int64_t,  \
                                            int64_t, Acc*, cudaStream_t);                                            \
  template void distribution_loss<Acc>(const Acc*, const int64_t*, int64_t, int64_t, int64_t, int64_t, Acc*, Acc*, \
                                       Acc*, int64_t*, Acc*, cudaStream_t);                                          \
  template void distribution_loss_backward<Acc>(const Acc*, const Acc*, const int64_t*, int64_t, int64_t, int64_t, \
                                                int64_t, const Acc*, const Acc*, const int64_t*, Acc*, Acc*,         \
                                                cudaStream_t);

#define CRL_INSTANTIATE_FEATURES(T, Acc)                                                                           \
  template void pair_distances<T, Acc>(const T*, Strides, const int64_t*, int64_t, int64_t, int64_t, int64_t, Acc*, \
                                       cudaStream_t);                                                               \
  template void pair_distances_backward_atomic<T, Acc>(const Acc*, const T*, Strides, const int64_t*, const Acc*,   \
                                                       int64_t, int64_t, int64_t, int64_t, Acc*, cudaStream_t);     \
  template void pair_distances_backward_sorted<T, Acc>(const Acc*, const T*, Strides, const int64_t*, const Acc*,   \
                                                       const int64_t*, const int64_t*, int64_t, int64_t, int64_t,   \
                                                       int64_t, Acc*, cudaStream_t);

CRL_INSTANTIATE_ACC(float)
CRL_INSTANTIATE_ACC(double)
CRL_INSTANTIATE_FEATURES(float, float)
CRL_INSTANTIATE_FEATURES(double, double)
CRL_INSTANTIATE_FEATURES(c10::Half, float)
CRL_INSTANTIATE_FEATURES(c10::BFloat16, float)

}  // namespace cuda
}  // namespace crl
