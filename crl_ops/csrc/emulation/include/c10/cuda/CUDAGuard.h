// The emulated device's stand-in for c10/cuda/CUDAGuard.h. The guard of an op call is where the
// emulator holds the device for the call: one op at a time, and every tensor the op allocates
// filled with the poison byte (emulated_ops.cpp), as the memory of a GPU holds old values.
#pragma once

#include <c10/core/Device.h>

namespace crl_emu {
void enter_op();
void leave_op();
}  // namespace crl_emu

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) { crl_emu::enter_op(); }
  ~CUDAGuard() { crl_emu::leave_op(); }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
