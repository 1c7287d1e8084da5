// CUDA value checks (docs/semantics.md, section 6): finite features and logits, and the overflow
// of a mined pair's squared distance. With validate, a failed check is a device-side assertion
// whose message names it; the kernels never synchronise with the host.
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace crl {
namespace cuda {
namespace {

#define CRL_CLASSES_MESSAGE "crl_ops: num_classes must be between 2 and the classes of the logits"

__device__ __forceinline__ bool finite_at(const Values& v, int64_t offset) {
  switch (v.dtype) {  // the same for the whole grid: no divergence
    case Dtype::Half:
      return isfinite(static_cast<float>(static_cast<const c10::Half*>(v.data)[offset]));
    case Dtype::BFloat16:
      return isfinite(static_cast<float>(static_cast<const c10::BFloat16*>(v.data)[offset]));
    case Dtype::Float:
      return isfinite(static_cast<const float*>(v.data)[offset]);
    default:
      return isfinite(static_cast<const double*>(v.data)[offset]);
  }
}

// The element offset of flat index e of a [n0, n1, n2] view; fewer divisions where the outer
// sizes are 1 (the host folds contiguous and broadcast dimensions away).
__device__ __forceinline__ int64_t offset_of(const Values& v, int64_t e) {
  if (v.size[0] == 1 && v.size[1] == 1) return e * v.stride[2];
  const int64_t inner = e % v.size[2], outer = e / v.size[2];
  if (v.size[0] == 1) return outer * v.stride[1] + inner * v.stride[2];
  return (outer / v.size[1]) * v.stride[0] + (outer % v.size[1]) * v.stride[1] + inner * v.stride[2];
}

__global__ void __launch_bounds__(kThreads)
    check_finite_kernel(Values features, bool has_features, Values logits, bool binary, const int64_t* num_classes,
                        bool validate, bool* finite, bool* checks, unsigned int* workspace) {
  const int64_t attributes = logits.size[1], max_classes = binary ? 2 : logits.size[2];
  CRL_GRID_STRIDE(j, attributes) {
    const int64_t classes = num_classes[j];
    CUDA_KERNEL_ASSERT_MSG(classes >= 2 && classes <= max_classes, CRL_CLASSES_MESSAGE);
  }
  bool features_ok = true, logits_ok = true;
  if (has_features) {
    const int64_t n = features.size[0] * features.size[1] * features.size[2];
    CRL_GRID_STRIDE(e, n) {
      const bool value_ok = finite_at(features, offset_of(features, e));
      if (validate) {
        CUDA_KERNEL_ASSERT_MSG(value_ok, CRL_FEATURES_MESSAGE);
      }
      features_ok &= value_ok;
    }
  }
  const int64_t n = logits.size[0] * logits.size[1] * logits.size[2];
  CRL_GRID_STRIDE(e, n) {
    const int64_t c = e % logits.size[2], j = (e / logits.size[2]) % attributes;
    if (!binary && c >= min(num_classes[j], max_classes)) continue;  // entries past C_j are never read
    const bool value_ok = finite_at(logits, offset_of(logits, e));
    if (validate) {
      CUDA_KERNEL_ASSERT_MSG(value_ok, CRL_LOGITS_MESSAGE);
    }
    logits_ok &= value_ok;
  }
  if (validate) {  // a non-finite value has stopped the kernel: whatever runs on sees only finite values
    if (blockIdx.x == 0 && threadIdx.x == 0) *finite = true;
    return;
  }
  unsigned int* bad = workspace + 1;  // bit 0: a logit, bit 1: a feature
  const unsigned int block_bad = (__syncthreads_or(!logits_ok) ? 1u : 0u) | (__syncthreads_or(!features_ok) ? 2u : 0u);
  if (block_bad != 0 && threadIdx.x == 0) atomicOr(bad, block_bad);
  if (arrive_last(workspace, gridDim.x) && threadIdx.x == 0) {
    const unsigned int all_bad = __ldcg(bad);
    if (checks != nullptr) {
      checks[0] = (all_bad & 1u) != 0;
      checks[1] = all_bad != 0;
    } else {
      *finite = all_bad == 0;
    }
  }
}

__global__ void check_overflow_kernel(const bool* overflow, bool double_accumulation) {
  if (double_accumulation) {
    CUDA_KERNEL_ASSERT_MSG(!*overflow, CRL_OVERFLOW_MESSAGE("float64"));
  } else {
    CUDA_KERNEL_ASSERT_MSG(!*overflow, CRL_OVERFLOW_MESSAGE("float32"));
  }
}

}  // namespace

void check_finite(const Values& features, bool has_features, const Values& logits, bool binary,
                  const int64_t* num_classes, bool validate, bool* finite, bool* checks, void* workspace,
                  cudaStream_t stream) {
  const int64_t feature_count = has_features ? features.size[0] * features.size[1] * features.size[2] : 0;
  const int64_t logit_count = logits.size[0] * logits.size[1] * logits.size[2];
  // About four values per thread; the kernel is bound by memory.
  const int blocks = blocks_for(std::max(feature_count, logit_count) / 4 + 1);
  if (!validate) C10_CUDA_CHECK(cudaMemsetAsync(workspace, 0, kCheckFiniteWorkspace, stream));
  CRL_LAUNCH(blocks, kThreads, 0, stream, check_finite_kernel)(features, has_features, logits, binary, num_classes, validate,
                                                       finite, checks, static_cast<unsigned int*>(workspace));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_overflow(const bool* overflow, bool double_accumulation, cudaStream_t stream) {
  CRL_LAUNCH(1, 1, 0, stream, check_overflow_kernel)(overflow, double_accumulation);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace crl
