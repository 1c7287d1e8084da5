// The emulated CUDA device: what the kernels of csrc/cuda/*.cu take from nvcc, for the host C++
// compiler. The tests' build force-includes this header into every .cu file (`-include`), so the
// kernels compile unchanged and run on the CPU, with CPU tensors standing for device memory.
//
// The execution model (runtime.cpp):
// - A launch runs its blocks one after another. A block's threads are fibers on one OS thread,
//   each with a stack of its own; a warp is 32 consecutive threads. A thread runs until it
//   reaches a barrier (__syncthreads*, __syncwarp) or a warp collective (shuffle, vote, match),
//   or exits; then the next ready thread runs, in the configured order (forward, reverse or
//   seeded random, which also orders the blocks).
// - A warp collective completes when every lane of its mask waits at a collective of the same
//   kind and mask; a block barrier when every thread of the block waits at the same one.
//   Anything else is an error that names the kernel, block, thread and line: a barrier some
//   threads never reach or reach elsewhere, a mask that names an exited lane or one waiting
//   elsewhere, a deadlock.
// - Shared memory: each __shared__ variable (CRL_SHARED) and the dynamic shared memory of a
//   launch are allocations of their exact size, filled with the poison byte at the start of every
//   block. Each launch is checked against the limits of an H100: threads per block, grid sizes,
//   48 KiB of shared memory unless the kernel opted in (cudaFuncSetAttribute), 227 KiB if so.
// - Atomics are plain read-modify-writes (one thread runs at a time); __threadfence and the cache
//   hints (__ldg, __ldcg) are plain loads. Memory ordering between blocks is not modelled:
//   blocks never run at once.
// - A failed CUDA_KERNEL_ASSERT_MSG stops the launch, which raises the error a GPU reports at
//   the next synchronisation ("device-side assert triggered") with the assertion's line.
#pragma once

#define CRL_CUDA_EMULATION 1

#include <c10/macros/Macros.h>  // before the redefinition of its kernel assertion below

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_runtime_api.h>  // the emulation's own (include/): types, streams, attributes

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define CRL_NOINLINE __attribute__((noinline))

namespace crl_emu {

// Where a barrier, collective or assertion is in the source.
struct Site {
  const char* file;
  int line;
};
#define CRL_EMU_SITE (::crl_emu::Site{__FILE__, __LINE__})

// The built-in variables of the thread that runs now (the scheduler sets them at every switch).
extern uint3 thread_index, block_index;
extern dim3 block_dim, grid_dim;

// ---- barriers and warp collectives (they switch threads) ----------------------------------------
void syncthreads(Site site);
int syncthreads_reduce(Site site, int kind, int predicate);  // kind: 0 or, 1 and, 2 count
void syncwarp(Site site, unsigned mask);
enum class Shuffle { Index, Up, Down, Xor };
uint64_t shuffle(Site site, unsigned mask, uint64_t bits, Shuffle mode, int operand, int width);
unsigned ballot(Site site, unsigned mask, int predicate);
unsigned match_any(Site site, unsigned mask, uint64_t bits, int size);

template <typename T>
T shuffle_value(Site site, unsigned mask, T value, Shuffle mode, int operand, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffle moves up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(site, mask, bits, mode, operand, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
unsigned match_value(Site site, unsigned mask, T value) {
  static_assert(std::is_integral<T>::value && (sizeof(T) == 4 || sizeof(T) == 8), "__match_any_sync takes 32 or 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return match_any(site, mask, bits, sizeof(T));
}

// ---- shared memory --------------------------------------------------------------------------------
// One CRL_SHARED declaration (a static object per template instantiation, as each instantiation has
// its own shared variable on a GPU): an allocation of the variable's exact size, filled with the
// poison byte at its first use in each block.
struct SharedSlot {
  void* data;
  uint64_t block;   // the block that used it last
  uint64_t launch;  // the launch that used it last (the shared-memory limit counts it once)
};
void* static_shared(SharedSlot& slot, size_t bytes, const char* name, Site site);
void* dynamic_shared();

template <typename T>
T& shared_variable(SharedSlot& slot, const char* name, Site site) {
  static_assert(std::is_trivially_destructible<T>::value, "shared memory holds trivial types");
  return *static_cast<T*>(static_shared(slot, sizeof(T), name, site));
}

// ---- atomics (read-modify-writes that the race check knows as atomic) --------------------------------
void note_atomic(const void* address, size_t size);

template <typename T, typename F>
T atomic_update(T* address, F update) {
  note_atomic(address, sizeof(T));
  // Builtin atomics, so that the race check's instrumentation does not see two plain accesses.
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T value = update(old);
  __atomic_store(address, &value, __ATOMIC_RELAXED);
  return old;
}

// ---- assertions and launches ----------------------------------------------------------------------------
[[noreturn]] void device_assert(const char* message, Site site, const char* function);

struct LaunchConfig {
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
  Site site;
};

// Runs `thread` for every thread of the grid (throws after a reported error).
void run_grid(const char* kernel, const void* entry, const LaunchConfig& config, void (*thread)(void*), void* state);

template <auto Kernel>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;  // "... [with auto Kernel = <the instantiated kernel>]"
}

template <auto Kernel>
struct Launch {
  LaunchConfig config;

  template <typename... Args>
  void operator()(Args&&... args) const {
    using Params = decltype(std::tuple(args...));
    Params params(std::forward<Args>(args)...);
    run_grid(kernel_name<Kernel>(), reinterpret_cast<const void*>(Kernel), config,
             [](void* state) { std::apply(Kernel, *static_cast<Params*>(state)); }, &params);
  }
};

}  // namespace crl_emu

#define threadIdx (::crl_emu::thread_index)
#define blockIdx (::crl_emu::block_index)
#define blockDim (::crl_emu::block_dim)
#define gridDim (::crl_emu::grid_dim)

// The launch, shared-memory and inlining macros of cuda/cuda_common.cuh.
#define CRL_LAUNCH(grid, block, shared, stream, ...) \
  (::crl_emu::Launch<__VA_ARGS__>{{dim3(grid), dim3(block), static_cast<size_t>(shared), stream, CRL_EMU_SITE}})
#define CRL_SHARED(type, name, ...)                           \
  static ::crl_emu::SharedSlot name##_emulated_slot{};        \
  type(&name) __VA_ARGS__ =                                   \
      ::crl_emu::shared_variable<type __VA_ARGS__>(name##_emulated_slot, #name, CRL_EMU_SITE)
#define CRL_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::crl_emu::dynamic_shared())

#define __syncthreads() ::crl_emu::syncthreads(CRL_EMU_SITE)
#define __syncthreads_or(predicate) ::crl_emu::syncthreads_reduce(CRL_EMU_SITE, 0, (predicate))
#define __syncthreads_and(predicate) ::crl_emu::syncthreads_reduce(CRL_EMU_SITE, 1, (predicate))
#define __syncthreads_count(predicate) ::crl_emu::syncthreads_reduce(CRL_EMU_SITE, 2, (predicate))
#define __syncwarp(...) ::crl_emu::syncwarp(CRL_EMU_SITE, ::crl_emu::mask_or_full(__VA_ARGS__))
#define __shfl_sync(mask, value, lane, ...) \
  ::crl_emu::shuffle_value(CRL_EMU_SITE, mask, value, ::crl_emu::Shuffle::Index, lane, ::crl_emu::width_or_warp(__VA_ARGS__))
#define __shfl_up_sync(mask, value, delta, ...) \
  ::crl_emu::shuffle_value(CRL_EMU_SITE, mask, value, ::crl_emu::Shuffle::Up, delta, ::crl_emu::width_or_warp(__VA_ARGS__))
#define __shfl_down_sync(mask, value, delta, ...) \
  ::crl_emu::shuffle_value(CRL_EMU_SITE, mask, value, ::crl_emu::Shuffle::Down, delta, ::crl_emu::width_or_warp(__VA_ARGS__))
#define __shfl_xor_sync(mask, value, lanes, ...) \
  ::crl_emu::shuffle_value(CRL_EMU_SITE, mask, value, ::crl_emu::Shuffle::Xor, lanes, ::crl_emu::width_or_warp(__VA_ARGS__))
#define __ballot_sync(mask, predicate) ::crl_emu::ballot(CRL_EMU_SITE, mask, (predicate))
#define __any_sync(mask, predicate) (::crl_emu::ballot(CRL_EMU_SITE, mask, (predicate)) != 0u)
#define __all_sync(mask, predicate) (::crl_emu::ballot(CRL_EMU_SITE, mask, !(predicate)) == 0u)
#define __match_any_sync(mask, value) ::crl_emu::match_value(CRL_EMU_SITE, mask, value)

#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  if (C10_UNLIKELY(!(cond))) ::crl_emu::device_assert(msg, CRL_EMU_SITE, __func__)

namespace crl_emu {
inline unsigned mask_or_full(unsigned mask = 0xffffffffu) { return mask; }
inline int width_or_warp(int width = 32) { return width; }
}  // namespace crl_emu

// ---- the device functions the kernels call ------------------------------------------------------------

inline void __threadfence() {}
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline long long __double_as_longlong(double x) { long long u; std::memcpy(&u, &x, 8); return u; }
inline double __longlong_as_double(long long u) { double x; std::memcpy(&x, &u, 8); return x; }
inline unsigned long long __double2ull_rn(double x) { return static_cast<unsigned long long>(std::nearbyint(x)); }

using std::isfinite;
using std::isinf;
using std::isnan;
using std::floor;
using std::ldexp;
using std::min;
using std::max;

template <typename T>
inline T atomicAdd(T* address, T value) {
  return ::crl_emu::atomic_update(address, [value](T old) { return static_cast<T>(old + value); });
}
inline unsigned atomicOr(unsigned* address, unsigned value) {
  return ::crl_emu::atomic_update(address, [value](unsigned old) { return old | value; });
}
template <typename T>
inline T atomicMax(T* address, T value) {
  return ::crl_emu::atomic_update(address, [value](T old) { return old < value ? value : old; });
}
