// Shared device helpers of the CUDA kernels: launch sizes, grid-stride loops and fixed-order
// block reductions.
#pragma once

#include <cstdint>

namespace crl {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kThreads = 256;

int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535 * 16)));
}

#define CRL_GRID_STRIDE(index, n) \
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < (n); index += int64_t(blockDim.x) * gridDim.x)

// Calls f with a compile-time capacity N >= k (k <= 32) for the register top-K lists.
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

}  // namespace cuda
}  // namespace crl
