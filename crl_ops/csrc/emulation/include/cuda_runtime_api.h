// The emulated device's stand-in for the CUDA runtime header (csrc/emulation/device.h): the types
// and the few runtime calls that the CUDA kernels and their launchers use. Everything runs at once
// on the calling thread; a stream is only a name.
#pragma once

#include <cstddef>
#include <cstring>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) longlong2 {
  long long x, y;
};
inline longlong2 make_longlong2(long long x, long long y) { return {x, y}; }

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}

namespace crl_emu {
// Counts a stream operation other than a launch (runtime.cpp: the statistics' memsets).
void count_memset();
}  // namespace crl_emu

inline cudaError_t cudaMemsetAsync(void* device, int value, size_t bytes, cudaStream_t = nullptr) {
  crl_emu::count_memset();
  std::memset(device, value, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

namespace crl_emu {
// Records a kernel's opt-in to more than 48 KiB of dynamic shared memory (runtime.cpp).
cudaError_t set_max_dynamic_shared(const void* entry, int bytes);
}  // namespace crl_emu

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* entry, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return crl_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(entry), value);
}
