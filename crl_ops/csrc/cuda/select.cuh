// Top-K selection in registers for the CUDA mining kernels: compile-time list capacities and
// warp / block merges of per-thread lists (common/crl_math.h holds the per-element order).
#pragma once

#include "common/crl_math.h"
#include "cuda/cuda_common.cuh"

namespace crl {
namespace cuda {

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

}  // namespace cuda
}  // namespace crl
