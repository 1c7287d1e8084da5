// What the tensor-level CUDA stages (losses_ops.cpp, mining_ops.cpp, pairs_ops.cpp) share: the
// current stream, scratch allocation and the kernels' views of a tensor.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"

namespace crl {
namespace cuda {

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

// `bytes` of uninitialised scratch on the device of `like`.
inline at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// A tensor in dtype `type` (a copy only where it is in another one).
inline at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

// features [B, A, D] read in place.
template <typename T>
Features<T> features_of(const at::Tensor& features) {
  return {features.data_ptr<T>(), features.size(2), features.stride(0), features.stride(1), features.stride(2)};
}

}  // namespace cuda
}  // namespace crl
