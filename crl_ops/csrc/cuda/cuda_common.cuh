// Shared device helpers of the CUDA kernels: launch sizes, grid-stride loops, fixed-order warp
// and block reductions, and the "last block" hand-over of a multi-block reduction. Light
// headers only (no ATen): every .cu includes this.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

// One source, two compilers: nvcc, and the host compiler for the emulated device of the tests
// (csrc/emulation/device.h, force-included, defines these four itself). Launches, shared-memory
// declarations and non-inlined device functions are written with them.
#if !defined(CRL_CUDA_EMULATION)
#define CRL_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#define CRL_SHARED(type, name, ...) __shared__ type name __VA_ARGS__
#define CRL_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define CRL_NOINLINE __noinline__
#endif

namespace crl {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kThreads = 256;
// Grids stop growing here; grid-stride loops cover the rest (no gridDim limit is ever reached).
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks)));
}

#define CRL_GRID_STRIDE(index, n) \
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < (n); index += int64_t(blockDim.x) * gridDim.x)

// The texts of overflow_message() (for the accumulation dtype's name) and values_message()
// (common/op_checks.h), as literals: the message of a device-side assertion must live in device code.
#define CRL_OVERFLOW_MESSAGE(dtype)                                                                      \
  "crl_ops: features are too large: the squared distance of a mined pair overflows " dtype "; scale them " \
  "down (normalize=True does) or use a wider dtype"
#define CRL_FEATURES_MESSAGE "crl_ops: features contain NaN or inf; CRL needs finite features"
#define CRL_LOGITS_MESSAGE "crl_ops: logits contain NaN or inf; CRL needs finite logits"

// ---- reductions ---------------------------------------------------------------------------------------

struct Sum {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a > b ? a : b; }
};

// Warp-wide reduction by a fixed shuffle tree; the result is valid in lane 0. All 32 lanes take part.
template <typename V, typename Op>
__device__ V warp_reduce(V value, Op op) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = op(value, __shfl_down_sync(kFullMask, value, offset));
  return value;
}

// Block-wide reduction in a fixed order (shuffles, then one warp). The result is valid in
// thread 0. blockDim.x must be a multiple of 32; `identity` fills the slots of absent warps.
template <typename V, typename Op>
__device__ V block_reduce(V value, Op op, V identity = V(0)) {
  CRL_SHARED(V, partial, [kWarp]);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // partial may still be read by a previous call
  value = warp_reduce(value, op);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) value = warp_reduce(lane < int(blockDim.x / kWarp) ? partial[lane] : identity, op);
  return value;
}

// Exclusive prefix sum over the block's threads in a fixed order: thread t gets the sum of the
// values of threads 0..t-1, every thread gets the block's total. blockDim.x a multiple of 32.
template <typename V>
__device__ V block_exclusive_scan(V value, V& total) {
  CRL_SHARED(V, warp_totals, [kWarp]);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  V inclusive = value;
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const V other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  V before = V(0), sum = V(0);
  for (int w = 0; w < warps; ++w) {  // at most 32 shared reads, the same order in every thread
    if (w == warp) before = sum;
    sum += warp_totals[w];
  }
  total = sum;
  V exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane == 0) exclusive = V(0);
  return before + exclusive;
}

// The hand-over of a multi-block reduction: every block calls this once it has written its
// partial results; it returns true in all threads of the one block that arrives last, which
// may then read every other block's partials (with __ldcg: past the non-coherent L1).
// `counter` must be zero before the launch (the launcher clears it with cudaMemsetAsync).
__device__ inline bool arrive_last(unsigned int* counter, unsigned int expected) {
  CRL_SHARED(bool, last);
  __threadfence();  // this block's partials are visible before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == expected - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

}  // namespace cuda
}  // namespace crl
