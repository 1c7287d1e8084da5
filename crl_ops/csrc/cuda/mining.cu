// CUDA kernels of hard mining (section 2): class-level lists and rows, anchor compaction, the
// fused distance + top-K instance miner. TO BE PORTED to the interface of cuda/mining.h.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common/crl_math.h"
#include "cuda/select.cuh"

namespace crl {
namespace cuda {
namespace {

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

}  // namespace

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

}  // namespace cuda
}  // namespace crl
