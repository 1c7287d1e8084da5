// CUDA hard mining (docs/semantics.md, section 2), the same selections as cpu/mining.cpp.
//
// Both modes run two kernels. The first walks the rows (sample, attribute): anchor flags, the
// empty (-1) partner rows of non-anchors (one warp writes a row, coalesced), and what the second
// kernel needs per candidate: the softmax normalisers (class mode, many classes) or a code
// label * 2 + misclassified (instance mode). In instance mode its first blocks also compact
// each attribute's anchors (block-wide scan, in sample order) and clear the overflow flag.
//
// Class mode: one block per active (attribute, class) list, 4 warps with a list each
// (select.cuh), merged at the end; the block then writes its class's anchor rows.
// Instance mode: one block per 32 anchors of an attribute (K <= 64). Candidates stream through
// shared memory in tiles of [32 dims x 128 candidates]; each lane owns an 8 anchors x 4
// candidates register tile, so a dimension step is 3 shared loads for 96 non-fused
// floating-point operations; the squared distances never leave registers before the lists of
// select.cuh filter them. Distances accumulate dimension by dimension in order (no FMA), as on
// the CPU, so both backends rank the same numbers. Larger K trade anchors per block for list
// room (K <= 256: 8 anchors, K <= 1024: 4).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "cuda/mining.h"
#include "cuda/select.cuh"

namespace crl {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;

template <typename T>
struct TypeTag {
  using type = T;
};
constexpr int64_t kThreadPerRowClasses = 32;  // above: one warp per row for the logits
constexpr int64_t kInlineSoftmaxClasses = 8;  // up to: class lists recompute each row's softmax

template <typename T>
__device__ __forceinline__ LogitsRow<T> logits_row(const Values& z, bool binary, int64_t i, int64_t j,
                                                   int64_t classes) {
  return {static_cast<const T*>(z.data) + i * z.stride[0] + j * z.stride[1], binary ? 0 : z.stride[2], binary,
          binary ? 2 : (classes < z.size[2] ? classes : z.size[2])};
}

// C_j as the kernels read it: num_classes within 0..Cmax (check_finite asserts 2..Cmax).
__device__ __forceinline__ int64_t classes_of(const MiningRows& m, int64_t j) {
  const int64_t c = m.num_classes[j];
  return c < 0 ? 0 : (c < m.max_classes ? c : m.max_classes);
}

// Partner rows of -1 for each lane's `row` where `empty`: one warp writes each row, 16 bytes a lane.
__device__ __forceinline__ void write_empty_rows(bool empty, int64_t row, const MiningRows& m) {
  const int lane = lane_index();
  const int64_t pairs = m.k;  // a row is 2K int64, K pairs of them
  unsigned todo = __ballot_sync(kFullMask, empty);
  while (todo != 0) {
    const int source = __ffs(todo) - 1;
    todo &= todo - 1;
    const int64_t r = __shfl_sync(kFullMask, row, source);
    longlong2* out = reinterpret_cast<longlong2*>(m.partners + r * 2 * m.k);
    for (int64_t p = lane; p < pairs; p += kWarp) out[p] = make_longlong2(kEmpty, kEmpty);
  }
}

// The argmax of predicted_class (common/crl_math.h) and, with_softmax, the normaliser of
// Softmax::of over one row, by a warp: lane l scans classes l, l + 32, ... for its argmax, the
// partial argmaxes merge in the sequential scan's terms (the highest value, the lowest class on a
// tie; NaN is skipped except at class 0, where the sequential scan keeps it); then each lane sums
// exp(z - max) over its classes in order and the lanes add by the butterfly that Softmax::of
// defines, so the normaliser is bitwise the CPU's.
template <typename Acc>
struct WarpArgmax {
  Acc value;
  int64_t index;  // -1: none yet

  __device__ bool first_over(const WarpArgmax& o) const {
    if (o.index < 0) return true;
    if (index < 0) return false;
    if (index == 0 && isnan(value)) return true;
    if (o.index == 0 && isnan(o.value)) return false;
    if (value != o.value) return value > o.value;
    return index < o.index;
  }
};

template <typename Acc, typename T>
__device__ void warp_row_statistics(const LogitsRow<T>& row, bool with_softmax, int64_t& predicted,
                                    Softmax<Acc>& softmax) {
  const int lane = lane_index();
  WarpArgmax<Acc> best{Acc(0), -1};
  for (int64_t c = lane; c < row.classes; c += kWarp) {
    const Acc z = row.template logit<Acc>(c);
    if (best.index < 0 ? (c == 0 || !isnan(z)) : z > best.value) best = {z, c};
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const WarpArgmax<Acc> other{__shfl_xor_sync(kFullMask, best.value, offset),
                                __shfl_xor_sync(kFullMask, best.index, offset)};
    if (other.first_over(best)) best = other;
  }
  predicted = best.index < 0 ? 0 : best.index;
  if (!with_softmax) return;
  static_assert(Softmax<Acc>::kLanes == kWarp, "the softmax sum's lanes are a warp's");
  Acc sum = Acc(0);
  for (int64_t c = lane; c < row.classes; c += kWarp) sum += exp_nonpositive(row.template logit<Acc>(c) - best.value);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum = sum + __shfl_xor_sync(kFullMask, sum, offset);
  softmax = {best.value, sum};
}

// ---- the rows kernel -------------------------------------------------------------------------------------

struct RowsArgs {
  Values logits;
  bool binary;
  MiningRows m;
  void* softmax;          // [B, A] Softmax<Acc>, or null
  int32_t* codes;         // [A, B] label * 2 + misclassified, -1 where not annotated; or null
  int32_t* anchor_list;   // [A, R]: the anchors of each attribute in sample order; or null
  int32_t* anchor_count;  // [A]
  bool* overflow;         // cleared; or null
  int64_t compact_blocks;
  bool warp_per_row;
};

// Blocks [0, compact_blocks): one attribute at a time, each thread a run of consecutive rows.
__device__ void compact_anchors(const RowsArgs& args) {
  const MiningRows& m = args.m;
  if (blockIdx.x == 0 && threadIdx.x == 0 && args.overflow != nullptr) *args.overflow = false;
  const int64_t run = (m.rows + blockDim.x - 1) / blockDim.x;
  for (int64_t j = blockIdx.x; j < m.attributes; j += args.compact_blocks) {
    const int64_t begin = m.first + threadIdx.x * run, end = min(m.first + m.rows, begin + run);
    int32_t count = 0;
    int64_t label;
    for (int64_t i = begin; i < end; ++i) {
      count += is_anchor(m.labels, m.active, m.attributes, m.max_classes, m.num_classes[j], i, j, label);
    }
    int32_t total;
    int32_t slot = block_exclusive_scan(count, total);
    int32_t* list = args.anchor_list + j * m.rows;
    for (int64_t i = begin; i < end; ++i) {
      if (is_anchor(m.labels, m.active, m.attributes, m.max_classes, m.num_classes[j], i, j, label)) {
        list[slot++] = static_cast<int32_t>(i);
      }
    }
    if (threadIdx.x == 0) args.anchor_count[j] = total;
  }
}

template <typename T>
__device__ void visit_row(const RowsArgs& args, int64_t q, int64_t predicted, const Softmax<acc_t<T>>& softmax,
                          bool write, bool& empty_row) {
  const MiningRows& m = args.m;
  const int64_t b = q / m.attributes, j = q % m.attributes;
  const int64_t label = m.labels[q];
  const bool annotated = is_annotated(label, classes_of(m, j));
  if (!write) return;
  if (args.codes != nullptr) {
    args.codes[j * m.batch + b] = annotated ? static_cast<int32_t>(label * 2 + (predicted != label)) : -1;
  }
  if (args.softmax != nullptr) static_cast<Softmax<acc_t<T>>*>(args.softmax)[q] = softmax;
  if (b >= m.first && b < m.first + m.rows) {
    const bool anchor = annotated && m.active[j * m.max_classes + label];
    m.anchors[q - m.first * m.attributes] = anchor;
    empty_row = !anchor;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) rows_kernel(RowsArgs args) {
  using Acc = acc_t<T>;
  if (blockIdx.x < args.compact_blocks) {
    compact_anchors(args);
    return;
  }
  const MiningRows& m = args.m;
  const int64_t total = m.batch * m.attributes, block = blockIdx.x - args.compact_blocks;
  const int64_t blocks = gridDim.x - args.compact_blocks;
  const bool statistics = args.codes != nullptr || args.softmax != nullptr;
  if (!args.warp_per_row) {
    for (int64_t base = block * blockDim.x; base < total; base += blocks * blockDim.x) {
      const int64_t q = base + threadIdx.x;
      bool empty_row = false;
      if (q < total) {
        const int64_t j = q % m.attributes, c_j = classes_of(m, j);
        const int64_t label = m.labels[q];
        int64_t predicted = 0;
        Softmax<Acc> softmax{Acc(0), Acc(0)};
        if (statistics && is_annotated(label, c_j)) {
          const LogitsRow<T> row = logits_row<T>(args.logits, args.binary, q / m.attributes, j, c_j);
          if (args.codes != nullptr) predicted = predicted_class<Acc>(row);
          if (args.softmax != nullptr) softmax = Softmax<Acc>::of(row);
        }
        visit_row<T>(args, q, predicted, softmax, true, empty_row);
      }
      write_empty_rows(empty_row, q - m.first * m.attributes, m);
    }
  } else {
    const int64_t warps = blocks * (blockDim.x / kWarp);
    for (int64_t q = block * (blockDim.x / kWarp) + threadIdx.x / kWarp; q < total; q += warps) {
      const int64_t j = q % m.attributes, c_j = classes_of(m, j);
      int64_t predicted = 0;
      Softmax<Acc> softmax{Acc(0), Acc(0)};
      if (statistics && is_annotated(m.labels[q], c_j)) {
        warp_row_statistics<Acc>(logits_row<T>(args.logits, args.binary, q / m.attributes, j, c_j),
                                 args.softmax != nullptr, predicted, softmax);
      }
      bool empty_row = false;
      visit_row<T>(args, q, predicted, softmax, lane_index() == 0, empty_row);
      write_empty_rows(__shfl_sync(kFullMask, empty_row, 0) && lane_index() == 0, q - m.first * m.attributes, m);
    }
  }
}

// ---- class mode -------------------------------------------------------------------------------------------

constexpr int kListWarps = 4;
constexpr int kLoadsInFlight = 4;  // chunks of samples whose loads a class-list thread issues together

template <typename Key, int R>
struct ClassLists {
  using Positives = WarpList<false, Key, R>;  // the lowest p_i(c) in class c
  using Negatives = WarpList<true, Key, R>;   // the highest p_i(c) elsewhere
  static constexpr int kStorage = Positives::kStorage;
  static constexpr size_t kShared =
      2 * kListWarps * (kStorage * (sizeof(Key) + sizeof(int32_t)) + sizeof(ListState<Key>));
};

struct ClassArgs {
  Values logits;
  bool binary;
  MiningRows m;
  const void* softmax;    // [B, A] Softmax<Acc>, or null: computed per row
  void* list_keys;        // class_lists: [A, Cmax, 2K] accumulation type; or null
  int64_t* list_indices;  // class_lists: [A, Cmax, 2K]
};

// class_lists' entries of list jc: slot p < K of its positives, then of its negatives; an empty
// slot is kEmpty with the empty key, as cpu::class_lists writes it.
template <typename Acc>
__device__ void write_list_slot(const ClassArgs& args, int64_t jc, int side, int p, int32_t index, Acc key) {
  const int64_t at = (jc * 2 + side) * args.m.k + p;
  const bool empty = index == kEmptyIndex;
  args.list_indices[at] = empty ? kEmpty : index;
  static_cast<Acc*>(args.list_keys)[at] =
      !empty ? key : (side == 0 ? empty_key<false, Acc>() : empty_key<true, Acc>());
}

template <typename T, int R>
__global__ void __launch_bounds__(kListWarps * kWarp) class_lists_kernel(ClassArgs args) {
  using Acc = acc_t<T>;
  using Lists = ClassLists<Acc, R>;
  CRL_DYNAMIC_SHARED(unsigned char, shared);
  const MiningRows& m = args.m;
  const int warp = threadIdx.x / kWarp, lane = lane_index(), k = static_cast<int>(m.k);
  // [list][storage] keys, then indices, then states; list 2 w: warp w's positives, 2 w + 1: negatives.
  Acc* keys = reinterpret_cast<Acc*>(shared);
  int32_t* index = reinterpret_cast<int32_t*>(keys + 2 * kListWarps * Lists::kStorage);
  ListState<Acc>* states = reinterpret_cast<ListState<Acc>*>(index + 2 * kListWarps * Lists::kStorage);
  const auto positives = [&](int w) {
    return typename Lists::Positives(keys + 2 * w * Lists::kStorage, index + 2 * w * Lists::kStorage, states + 2 * w);
  };
  const auto negatives = [&](int w) {
    return typename Lists::Negatives(keys + (2 * w + 1) * Lists::kStorage, index + (2 * w + 1) * Lists::kStorage,
                                     states + 2 * w + 1);
  };
  const Softmax<Acc>* normalisers = static_cast<const Softmax<Acc>*>(args.softmax);

  for (int64_t jc = blockIdx.x; jc < m.attributes * m.max_classes; jc += gridDim.x) {
    const int64_t j = jc / m.max_classes, c = jc % m.max_classes, c_j = classes_of(m, j);
    if (c >= c_j || (m.active != nullptr && !m.active[jc])) {  // null active: class_lists of every class
      for (int p = threadIdx.x; args.list_indices != nullptr && p < 2 * k; p += blockDim.x) {
        write_list_slot<Acc>(args, jc, p / k, p % k, kEmptyIndex, Acc(0));
      }
      continue;
    }
    __syncthreads();  // the previous list's rows are written
    auto pos = positives(warp);
    auto neg = negatives(warp);
    pos.reset();
    neg.reset();
    // kLoadsInFlight chunks of samples at a time: their loads overlap, then the lists take them.
    for (int64_t base = 0; base < m.batch; base += kLoadsInFlight * blockDim.x) {
      int64_t label[kLoadsInFlight];
      Acc key[kLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int64_t i = base + u * blockDim.x + threadIdx.x;
        label[u] = i < m.batch ? m.labels[i * m.attributes + j] : kEmpty;
        key[u] = Acc(0);
        if (is_annotated(label[u], c_j)) {
          const LogitsRow<T> row = logits_row<T>(args.logits, args.binary, i, j, c_j);
          const Softmax<Acc> softmax =
              normalisers != nullptr ? normalisers[i * m.attributes + j] : Softmax<Acc>::of(row);
          key[u] = softmax.probability(row.template logit<Acc>(c));
        }
      }
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int32_t candidate = static_cast<int32_t>(base + u * blockDim.x + threadIdx.x);
        const bool annotated = is_annotated(label[u], c_j);
        pos.push(annotated && label[u] == c && pos.admits(key[u], candidate), key[u], candidate, k);
        neg.push(annotated && label[u] != c && neg.admits(key[u], candidate), key[u], candidate, k);
      }
    }
    pos.finish(k);
    neg.finish(k);
    __syncthreads();
    if (warp == 0) {
      for (int w = 1; w < kListWarps; ++w) {
        const auto other_pos = positives(w);
        const auto other_neg = negatives(w);
        if (other_pos.index[0] != kEmptyIndex) pos.absorb(other_pos.keys, other_pos.index, k);
        if (other_neg.index[0] != kEmptyIndex) neg.absorb(other_neg.keys, other_neg.index, k);
      }
    }
    __syncthreads();
    const auto merged_pos = positives(0);
    const auto merged_neg = negatives(0);
    for (int p = threadIdx.x; args.list_indices != nullptr && p < k; p += blockDim.x) {
      write_list_slot<Acc>(args, jc, 0, p, merged_pos.index[p], merged_pos.keys[p]);
      write_list_slot<Acc>(args, jc, 1, p, merged_neg.index[p], merged_neg.keys[p]);
    }
    // The rows of the class's anchors: its K hardest positives (without the anchor) and negatives.
    const int32_t* hard_pos = merged_pos.index;
    const int32_t* hard_neg = merged_neg.index;
    for (int64_t base = m.first; base < m.first + m.rows; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const int64_t label = i < m.first + m.rows ? m.labels[i * m.attributes + j] : kEmpty;
      unsigned anchors = __ballot_sync(kFullMask, is_annotated(label, c_j) && label == c);
      while (anchors != 0) {
        const int source = __ffs(anchors) - 1;
        anchors &= anchors - 1;
        const int64_t a = base + warp * kWarp + source;
        int64_t* row = m.partners + ((a - m.first) * m.attributes + j) * 2 * m.k;
        for (int p = lane; p < k; p += kWarp) {
          const int32_t hp = hard_pos[p], hn = hard_neg[p];
          row[p] = hp == kEmptyIndex || hp == a ? kEmpty : hp;
          row[k + p] = hn == kEmptyIndex ? kEmpty : hn;
        }
      }
    }
  }
}

// ---- instance mode ----------------------------------------------------------------------------------------

template <typename Acc, int R>
struct InstanceTile {
  static constexpr int kWarps = 4;
  static constexpr int kAnchorsPerWarp = R <= 2 ? 8 : (R <= 8 ? 2 : 1);
  static constexpr int kSlots = kWarp / kAnchorsPerWarp;  // candidates per lane
  static constexpr int kAnchors = kWarps * kAnchorsPerWarp;
  static constexpr int kCandidates = kWarp * kSlots;    // per chunk
  static constexpr int kDims = 4096 / kCandidates;       // per slab: a [kDims x kCandidates] tile
  static constexpr int kGroupDims = kDims < 8 ? kDims : 8;  // a warp loads kGroupDims x kGroupItems
  static constexpr int kGroupItems = kWarp / kGroupDims;
  // Row strides: one warp's stores of a load group hit 32 different banks, rows stay 16-byte aligned.
  static constexpr int kCandidateRow = kCandidates + kGroupItems;
  static constexpr int kAnchorRow = kAnchors + kGroupItems;
  using Positives = WarpList<true, Acc, R>;   // the largest distances among misclassified positives
  using Negatives = WarpList<false, Acc, R>;  // the smallest among the other classes
  static constexpr int kStorage = Positives::kStorage;
  static constexpr size_t kCandidateTile = size_t(kDims) * kCandidateRow * sizeof(Acc);
  static constexpr size_t kAnchorTile = size_t(kDims) * kAnchorRow * sizeof(Acc);
  static constexpr size_t kListKeys = size_t(2) * kAnchors * kStorage * sizeof(Acc);
  static constexpr size_t kListIndex = size_t(2) * kAnchors * kStorage * sizeof(int32_t);
  static constexpr size_t kStates = size_t(2) * kAnchors * sizeof(ListState<Acc>);
  static constexpr size_t kShared = kCandidateTile + kAnchorTile + kListKeys + kListIndex + kStates +
                                    2 * kAnchors * sizeof(int32_t);
  static_assert(kCandidates % 128 == 0 && kDims % kGroupDims == 0, "tile shape");
  static_assert(kShared <= 227 * 1024, "an H100/H200 block has at most 227 KiB of shared memory");
};

struct InstanceArgs {
  Values features;
  MiningRows m;
  const int32_t* codes;
  const int32_t* anchor_list;
  const int32_t* anchor_count;
  bool* overflow;
};

// v[at..at + 4) = four consecutive values of 16-byte aligned shared memory.
template <int N>
__device__ __forceinline__ void load4(const float* p, float (&v)[N], int at) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[at] = t.x;
  v[at + 1] = t.y;
  v[at + 2] = t.z;
  v[at + 3] = t.w;
}
template <int N>
__device__ __forceinline__ void load4(const double* p, double (&v)[N], int at) {
  const double2 low = *reinterpret_cast<const double2*>(p), high = *reinterpret_cast<const double2*>(p + 2);
  v[at] = low.x;
  v[at + 1] = low.y;
  v[at + 2] = high.x;
  v[at + 3] = high.y;
}

// anchor_tile[d * kAnchorRow + slot] = x[anchor_sample[slot], d0 + d] in Acc for d < kDims (0
// past the features or for empty slots): per load, a warp reads kGroupDims consecutive dimensions
// of kGroupItems anchors.
template <typename Tile, typename T, typename Acc>
__device__ __forceinline__ void load_anchor_slab(const T* x, int64_t sample_stride, int64_t dim_stride, int64_t d0,
                                                 int64_t dim, const int32_t* anchor_sample, Acc* tile) {
  constexpr int kItemGroups = (Tile::kAnchors + Tile::kGroupItems - 1) / Tile::kGroupItems;
  constexpr int kDimGroups = Tile::kDims / Tile::kGroupDims;
  const int lane = lane_index(), warp = threadIdx.x / kWarp;
  for (int g = warp; g < kItemGroups * kDimGroups; g += Tile::kWarps) {
    const int item = (g / kDimGroups) * Tile::kGroupItems + lane / Tile::kGroupDims;
    const int d = (g % kDimGroups) * Tile::kGroupDims + lane % Tile::kGroupDims;
    if (item >= Tile::kAnchors) continue;
    const int64_t s = anchor_sample[item];
    Acc value = Acc(0);
    if (s >= 0 && d0 + d < dim) value = static_cast<Acc>(x[s * sample_stride + (d0 + d) * dim_stride]);
    tile[d * Tile::kAnchorRow + item] = value;
  }
}

// candidate_tile[d * kCandidateRow + c] = x[b0 + c, d0 + d] in Acc (0 past the batch or the
// features). Warp w always loads the same kGroupDims dimensions, kGroupItems candidates at a
// time, walking the candidates with one pointer increment per load.
template <typename Tile, typename T, typename Acc>
__device__ __forceinline__ void load_candidate_slab(const T* x, int64_t sample_stride, int64_t dim_stride,
                                                    int64_t b0, int64_t batch, int64_t d0, int64_t dim,
                                                    Acc* tile) {
  constexpr int kDimGroups = Tile::kDims / Tile::kGroupDims;
  static_assert(Tile::kWarps % kDimGroups == 0, "every warp keeps its dimensions");
  constexpr int kItemStep = (Tile::kWarps / kDimGroups) * Tile::kGroupItems;
  constexpr int kLoads = Tile::kCandidates / kItemStep;
  const int lane = lane_index(), warp = threadIdx.x / kWarp;
  const int d = (warp % kDimGroups) * Tile::kGroupDims + lane % Tile::kGroupDims;
  const int first = (warp / kDimGroups) * Tile::kGroupItems + lane / Tile::kGroupDims;
  const bool dim_inside = d0 + d < dim;
  const int64_t remaining = batch - b0 - first;  // load t is inside when t * kItemStep < remaining
  const T* source = x + (b0 + first) * sample_stride + (d0 + d) * dim_stride;
  const int64_t step = kItemStep * sample_stride;
  Acc* target = tile + d * Tile::kCandidateRow + first;
#pragma unroll 8
  for (int t = 0; t < kLoads; ++t) {
    target[t * kItemStep] = dim_inside && t * kItemStep < remaining ? static_cast<Acc>(*source) : Acc(0);
    source += step;
  }
}

template <typename Tile, typename Acc>
__device__ __forceinline__ void load_slabs(const Values& features, int64_t j, int64_t b0, int64_t d0,
                                           const int32_t* anchor_sample, Acc* candidate_tile, Acc* anchor_tile) {
  const int64_t sb = features.stride[0], sd = features.stride[2], batch = features.size[0], dim = features.size[2];
  const auto load = [&](auto typed) {
    using T = typename decltype(typed)::type;
    const T* x = static_cast<const T*>(features.data) + j * features.stride[1];
    load_candidate_slab<Tile>(x, sb, sd, b0, batch, d0, dim, candidate_tile);
    load_anchor_slab<Tile>(x, sb, sd, d0, dim, anchor_sample, anchor_tile);
  };
  if constexpr (std::is_same<Acc, double>::value) {
    load(TypeTag<double>());
  } else {
    switch (features.dtype) {  // the same in the whole grid
      case Dtype::Half:
        load(TypeTag<c10::Half>());
        break;
      case Dtype::BFloat16:
        load(TypeTag<c10::BFloat16>());
        break;
      default:
        load(TypeTag<float>());
        break;
    }
  }
}

template <typename Acc, int R>
__global__ void __launch_bounds__(InstanceTile<Acc, R>::kWarps * kWarp) instance_kernel(InstanceArgs args) {
  using Tile = InstanceTile<Acc, R>;
  constexpr int kA = Tile::kAnchorsPerWarp, kS = Tile::kSlots;
  CRL_DYNAMIC_SHARED(unsigned char, shared);
  Acc* candidate_tile = reinterpret_cast<Acc*>(shared);
  Acc* anchor_tile = reinterpret_cast<Acc*>(shared + Tile::kCandidateTile);
  Acc* list_keys = reinterpret_cast<Acc*>(shared + Tile::kCandidateTile + Tile::kAnchorTile);
  int32_t* list_index = reinterpret_cast<int32_t*>(shared + Tile::kCandidateTile + Tile::kAnchorTile + Tile::kListKeys);
  ListState<Acc>* states = reinterpret_cast<ListState<Acc>*>(list_index + 2 * Tile::kAnchors * Tile::kStorage);
  int32_t* anchor_sample = reinterpret_cast<int32_t*>(states + 2 * Tile::kAnchors);
  int32_t* anchor_label = anchor_sample + Tile::kAnchors;

  const MiningRows& m = args.m;
  const int warp = threadIdx.x / kWarp, lane = lane_index(), k = static_cast<int>(m.k);
  const int64_t batch = m.batch, dim = args.features.size[2];
  const int64_t groups = (m.rows + Tile::kAnchors - 1) / Tile::kAnchors;
  // List 2 s: the positives of the block's anchor slot s, 2 s + 1: its negatives.
  const auto positives = [&](int s) {
    return typename Tile::Positives(list_keys + 2 * s * Tile::kStorage, list_index + 2 * s * Tile::kStorage,
                                    states + 2 * s);
  };
  const auto negatives = [&](int s) {
    return typename Tile::Negatives(list_keys + (2 * s + 1) * Tile::kStorage,
                                    list_index + (2 * s + 1) * Tile::kStorage, states + 2 * s + 1);
  };

  for (int64_t task = blockIdx.x; task < groups * m.attributes; task += gridDim.x) {
    // Attribute-major: the blocks running at a time share a few attributes' features in L2.
    const int64_t j = task / groups, first_slot = (task % groups) * Tile::kAnchors;
    const int64_t count = args.anchor_count[j];
    if (first_slot >= count) continue;
    const int32_t* codes = args.codes + j * batch;
    __syncthreads();  // the previous task is done with the shared arrays
    if (threadIdx.x < Tile::kAnchors) {
      const int64_t slot = first_slot + threadIdx.x;
      const int32_t a = slot < count ? args.anchor_list[j * m.rows + slot] : -1;
      anchor_sample[threadIdx.x] = a;
      anchor_label[threadIdx.x] = a >= 0 ? codes[a] >> 1 : -1;
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < kA; ++a) {
      const int s = warp * kA + a;
      if (anchor_sample[s] < 0) continue;
      auto pos = positives(s);
      auto neg = negatives(s);
      pos.reset();
      pos.store();
      neg.reset();
      neg.store();
    }

    for (int64_t b0 = 0; b0 < batch; b0 += Tile::kCandidates) {
      // The lane's candidates: b0 + 128 (s / 4) + 4 lane + s % 4, so that 16-byte loads of a
      // tile row are conflict-free.
      int32_t candidate[kS], code[kS];
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        const int64_t b = b0 + 128 * (s / 4) + 4 * lane + s % 4;
        candidate[s] = b < batch ? static_cast<int32_t>(b) : -1;
        code[s] = b < batch ? __ldg(codes + b) : -1;
      }
      Acc squared[kA][kS];
#pragma unroll
      for (int a = 0; a < kA; ++a) {
#pragma unroll
        for (int s = 0; s < kS; ++s) squared[a][s] = Acc(0);
      }
      for (int64_t d0 = 0; d0 < dim; d0 += Tile::kDims) {
        __syncthreads();  // the previous slab is consumed
        load_slabs<Tile>(args.features, j, b0, d0, anchor_sample, candidate_tile, anchor_tile);
        __syncthreads();
        const int dims = static_cast<int>(min(int64_t(Tile::kDims), dim - d0));
#pragma unroll 4
        for (int d = 0; d < dims; ++d) {  // in order of d, as the CPU: the same rounding
          Acc x_anchor[kA], x_candidate[kS];
          const Acc* anchor_row = anchor_tile + d * Tile::kAnchorRow + warp * kA;
          if constexpr (kA % 4 == 0) {
#pragma unroll
            for (int q = 0; q < kA / 4; ++q) load4(anchor_row + 4 * q, x_anchor, 4 * q);
          } else {
#pragma unroll
            for (int a = 0; a < kA; ++a) x_anchor[a] = anchor_row[a];
          }
#pragma unroll
          for (int q = 0; q < kS / 4; ++q) {
            load4(candidate_tile + d * Tile::kCandidateRow + 128 * q + 4 * lane, x_candidate, 4 * q);
          }
#pragma unroll
          for (int a = 0; a < kA; ++a) {
#pragma unroll
            for (int s = 0; s < kS; ++s) accumulate_squared(squared[a][s], x_anchor[a], x_candidate[s]);
          }
        }
      }
      // Selection: the lists admit what ranks before their threshold.
#pragma unroll
      for (int a = 0; a < kA; ++a) {
        const int slot = warp * kA + a;
        const int32_t sample = anchor_sample[slot];
        if (sample < 0) continue;
        const int32_t label = anchor_label[slot];
        auto pos = positives(slot);
        auto neg = negatives(slot);
        pos.load();
        neg.load();
        bool take_pos[kS], take_neg[kS], any_pos = false, any_neg = false;
#pragma unroll
        for (int s = 0; s < kS; ++s) {
          const int32_t other = code[s] >> 1;  // -1 where not annotated or past the batch
          take_neg[s] = code[s] >= 0 && other != label && neg.admits(squared[a][s], candidate[s]);
          take_pos[s] = other == label && (code[s] & 1) && candidate[s] != sample &&
                        pos.admits(squared[a][s], candidate[s]);
          any_pos |= take_pos[s];
          any_neg |= take_neg[s];
        }
        if (__any_sync(kFullMask, any_neg)) {
#pragma unroll
          for (int s = 0; s < kS; ++s) neg.push(take_neg[s], squared[a][s], candidate[s], k);
          neg.store();
        }
        if (__any_sync(kFullMask, any_pos)) {
#pragma unroll
          for (int s = 0; s < kS; ++s) pos.push(take_pos[s], squared[a][s], candidate[s], k);
          pos.store();
        }
      }
    }

    // Rows: the K farthest misclassified positives, then the K nearest negatives.
    bool overflow = false;
#pragma unroll
    for (int a = 0; a < kA; ++a) {
      const int slot = warp * kA + a;
      const int32_t sample = anchor_sample[slot];
      if (sample < 0) continue;
      auto pos = positives(slot);
      auto neg = negatives(slot);
      pos.load();
      pos.finish(k);
      neg.load();
      neg.finish(k);
      int64_t* row = m.partners + ((sample - m.first) * m.attributes + j) * 2 * m.k;
      for (int p = lane; p < k; p += kWarp) {
        const int32_t hp = pos.index[p], hn = neg.index[p];
        row[p] = hp == kEmptyIndex ? kEmpty : hp;
        row[k + p] = hn == kEmptyIndex ? kEmpty : hn;
        overflow |= (hp != kEmptyIndex && isinf(pos.keys[p])) || (hn != kEmptyIndex && isinf(neg.keys[p]));
      }
    }
    if (__any_sync(kFullMask, overflow) && lane == 0) *args.overflow = true;
  }
}

// ---- class mode's partner rows (distributed=True) --------------------------------------------------------

__global__ void __launch_bounds__(kThreads) partner_rows_kernel(const int64_t* lists, MiningRows m) {
  CRL_GRID_STRIDE(q, m.rows * m.attributes) {
    const int64_t j = q % m.attributes;
    m.anchors[q] = write_partner_row(m.labels, m.active, lists, m.attributes, m.max_classes, m.num_classes[j], m.k,
                                     m.first + q / m.attributes, j, m.rows, m.partners + q * 2 * m.k);
  }
}

// ---- launches ---------------------------------------------------------------------------------------------

template <typename F>
void dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::Half:
      f(TypeTag<c10::Half>());
      break;
    case Dtype::BFloat16:
      f(TypeTag<c10::BFloat16>());
      break;
    case Dtype::Float:
      f(TypeTag<float>());
      break;
    default:
      f(TypeTag<double>());
      break;
  }
}

// Launches kKernel with `shared` bytes of dynamic shared memory, raising the kernel's limit
// above the default 48 KiB once per device.
template <auto kKernel, typename Args>
void launch_with_shared(int64_t blocks, int threads, size_t shared, cudaStream_t stream, const Args& args) {
  constexpr int kDevices = 64;
  static std::atomic<bool> raised[kDevices];
  if (shared > 48 * 1024) {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    if (device >= kDevices || !raised[device].load(std::memory_order_acquire)) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
      if (device < kDevices) raised[device].store(true, std::memory_order_release);
    }
  }
  CRL_LAUNCH(static_cast<int>(std::min(blocks, kMaxBlocks)), threads, shared, stream, kKernel)(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool softmax_scratch_needed(const MiningRows& m, bool binary) {
  return !binary && m.max_classes > kInlineSoftmaxClasses;
}

size_t accumulation_size(Dtype dtype) {
  return dtype == Dtype::Double ? sizeof(double) : sizeof(float);
}

void launch_rows(const RowsArgs& args, cudaStream_t stream) {
  const MiningRows& m = args.m;
  const int64_t rows = m.batch * m.attributes;
  const int64_t per_block = args.warp_per_row ? kRowThreads / kWarp : kRowThreads;
  const int64_t row_blocks = std::min<int64_t>(std::max<int64_t>(1, (rows + per_block - 1) / per_block),
                                               kMaxBlocks - args.compact_blocks);
  dispatch_dtype(args.logits.dtype, [&](auto typed) {
    using T = typename decltype(typed)::type;
    CRL_LAUNCH(static_cast<int>(args.compact_blocks + row_blocks), kRowThreads, 0, stream, rows_kernel<T>)(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

RowsArgs rows_args(const Values& logits, bool binary, const MiningRows& m) {
  RowsArgs args{};
  args.logits = logits;
  args.binary = binary;
  args.m = m;
  args.warp_per_row = !binary && m.max_classes > kThreadPerRowClasses;
  return args;
}

}  // namespace

size_t mine_class_workspace(const MiningRows& m, const Values& logits, bool binary) {
  return softmax_scratch_needed(m, binary) ? 2 * accumulation_size(logits.dtype) * m.batch * m.attributes : 0;
}

namespace {

// The rows kernel where the lists need the softmax normalisers (or mine_class its anchors' rows),
// then one block per (attribute, class) list.
void launch_lists(const Values& logits, bool binary, const MiningRows& m, void* workspace, void* list_keys,
                  int64_t* list_indices, cudaStream_t stream) {
  RowsArgs rows = rows_args(logits, binary, m);
  rows.softmax = softmax_scratch_needed(m, binary) ? workspace : nullptr;
  if (m.rows > 0 || rows.softmax != nullptr) launch_rows(rows, stream);
  const ClassArgs args{logits, binary, m, rows.softmax, list_keys, list_indices};
  dispatch_dtype(logits.dtype, [&](auto typed) {
    using T = typename decltype(typed)::type;
    dispatch_list_registers(m.k, [&](auto registers) {
      constexpr int kR = decltype(registers)::value;
      launch_with_shared<class_lists_kernel<T, kR>>(m.attributes * m.max_classes, kListWarps * kWarp,
                                                    ClassLists<acc_t<T>, kR>::kShared, stream, args);
    });
  });
}

}  // namespace

void launch_mine_class(const Values& logits, bool binary, const MiningRows& m, void* workspace, cudaStream_t stream) {
  if (m.rows == 0) return;  // no outputs (rows <= batch)
  launch_lists(logits, binary, m, workspace, nullptr, nullptr, stream);
}

void launch_class_lists(const Values& logits, bool binary, const MiningRows& m, void* keys, int64_t* indices,
                        void* workspace, cudaStream_t stream) {
  if (m.attributes * m.max_classes == 0) return;
  launch_lists(logits, binary, m, workspace, keys, indices, stream);
}

void launch_partner_rows(const int64_t* lists, const MiningRows& m, cudaStream_t stream) {
  if (m.rows * m.attributes == 0) return;
  CRL_LAUNCH(blocks_for(m.rows * m.attributes), kThreads, 0, stream, partner_rows_kernel)(lists, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

size_t mine_instance_workspace(const MiningRows& m) {
  return sizeof(int32_t) * m.attributes * (m.batch + m.rows + 1);
}

void launch_mine_instance(const Values& features, const Values& logits, bool binary, const MiningRows& m,
                          bool* overflow, void* workspace, cudaStream_t stream) {
  RowsArgs rows = rows_args(logits, binary, m);
  rows.codes = static_cast<int32_t*>(workspace);
  rows.anchor_list = rows.codes + m.attributes * m.batch;
  rows.anchor_count = rows.anchor_list + m.attributes * m.rows;
  rows.overflow = overflow;
  rows.compact_blocks = std::min<int64_t>(m.attributes, kMaxBlocks / 2);
  launch_rows(rows, stream);  // also when there is nothing to mine: it clears the flag
  if (m.rows == 0) return;
  const InstanceArgs args{features, m, rows.codes, rows.anchor_list, rows.anchor_count, overflow};
  const bool wide = features.dtype == Dtype::Double;
  dispatch_list_registers(m.k, [&](auto registers) {
    constexpr int kR = decltype(registers)::value;
    const auto launch = [&](auto accumulation) {
      using Acc = typename decltype(accumulation)::type;
      using Tile = InstanceTile<Acc, kR>;
      const int64_t groups = (m.rows + Tile::kAnchors - 1) / Tile::kAnchors;
      launch_with_shared<instance_kernel<Acc, kR>>(groups * m.attributes, Tile::kWarps * kWarp, Tile::kShared,
                                                   stream, args);
    };
    if (wide) {
      launch(TypeTag<double>());
    } else {
      launch(TypeTag<float>());
    }
  });
}

}  // namespace cuda
}  // namespace crl
