// The emulated device's stand-in for c10/cuda/CUDAException.h: a failed runtime call raises; a
// launch raises by itself when the emulator reports an error (csrc/emulation/runtime.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#define C10_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t crl_emulated_error = (expr);                                             \
    if (crl_emulated_error != cudaSuccess) {                                                   \
      throw std::runtime_error(std::string("CUDA error (emulated device): ") +                 \
                               cudaGetErrorString(crl_emulated_error) + " in " #expr);        \
    }                                                                                          \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
