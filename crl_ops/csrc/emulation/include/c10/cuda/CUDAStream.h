// The emulated device's stand-in for c10/cuda/CUDAStream.h: one stream, the null one.
#pragma once

#include <cuda_runtime_api.h>

namespace c10 {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream() { return {}; }

}  // namespace cuda
}  // namespace c10
