// CUDA kernels of batch profiling (section 1) and the value checks (section 6). TO BE PORTED.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common/crl_math.h"
#include "cuda/cuda_common.cuh"

namespace crl {
namespace cuda {
namespace {

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

}  // namespace

void profile(const int64_t* labels, int64_t batch, int64_t attributes, int64_t max_classes, int64_t* counts,
             bool* minority, bool* active, cudaStream_t stream) {
  profile_kernel<<<attributes, kThreads, 0, stream>>>(labels, batch, attributes, max_classes, counts, minority, active);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace crl
