// The race check's instrumentation: the racecheck build compiles the kernels with
// -fsanitize=thread, which calls these functions at every memory access, and links this file in
// place of ThreadSanitizer's runtime. Accesses to shared memory go to the emulator's race check
// (runtime.cpp); atomics of host code keep their meaning.
#include <cstddef>
#include <cstdint>

#include "emulation/runtime.h"

namespace {

struct RaceCheckOn {
  RaceCheckOn() { crl_emu::enable_race_check(); }
} race_check_on;

// `pc`: the instrumented access's code address, for the report's line.
inline void access(const void* address, size_t size, bool write, const void* pc) {
  crl_emu::race_access(address, size, write, false, pc);
}

}  // namespace

#define CRL_ACCESS_HOOKS(n)                                                                                       \
  extern "C" __attribute__((noinline)) void __tsan_read##n(void* a) { access(a, n, false, __builtin_return_address(0)); }                    \
  extern "C" __attribute__((noinline)) void __tsan_write##n(void* a) { access(a, n, true, __builtin_return_address(0)); }                    \
  extern "C" __attribute__((noinline)) void __tsan_unaligned_read##n(void* a) { access(a, n, false, __builtin_return_address(0)); }          \
  extern "C" __attribute__((noinline)) void __tsan_unaligned_write##n(void* a) { access(a, n, true, __builtin_return_address(0)); }

CRL_ACCESS_HOOKS(1)
CRL_ACCESS_HOOKS(2)
CRL_ACCESS_HOOKS(4)
CRL_ACCESS_HOOKS(8)
CRL_ACCESS_HOOKS(16)

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
__attribute__((noinline)) void __tsan_read_range(void* a, unsigned long size) { access(a, size, false, __builtin_return_address(0)); }
__attribute__((noinline)) void __tsan_write_range(void* a, unsigned long size) { access(a, size, true, __builtin_return_address(0)); }
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}

// Atomics of host code (std::atomic): performed as asked, sequentially consistent.
#define CRL_FETCH_HOOK(bits, type, op)                                                \
  extern "C" type __tsan_atomic##bits##_fetch_##op(volatile type* a, type v, int) { \
    return __atomic_fetch_##op(a, v, __ATOMIC_SEQ_CST);                               \
  }
#define CRL_COMPARE_EXCHANGE_HOOK(bits, type, name, weak)                                                       \
  extern "C" int __tsan_atomic##bits##_compare_exchange_##name(volatile type* a, type* expected, type v, int, \
                                                               int) {                                         \
    return __atomic_compare_exchange_n(a, expected, v, weak, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
  }
#define CRL_ATOMIC_HOOKS(bits, type)                                                                              \
  extern "C" type __tsan_atomic##bits##_load(const volatile type* a, int) {                                     \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                                  \
  }                                                                                                               \
  extern "C" void __tsan_atomic##bits##_store(volatile type* a, type v, int) {                                  \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                     \
  }                                                                                                               \
  extern "C" type __tsan_atomic##bits##_exchange(volatile type* a, type v, int) {                               \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                               \
  CRL_FETCH_HOOK(bits, type, add)                                                                                 \
  CRL_FETCH_HOOK(bits, type, sub)                                                                                 \
  CRL_FETCH_HOOK(bits, type, and)                                                                                 \
  CRL_FETCH_HOOK(bits, type, or)                                                                                  \
  CRL_FETCH_HOOK(bits, type, xor)                                                                                 \
  CRL_COMPARE_EXCHANGE_HOOK(bits, type, strong, false)                                                            \
  CRL_COMPARE_EXCHANGE_HOOK(bits, type, weak, true)                                                               \
  extern "C" type __tsan_atomic##bits##_compare_exchange_val(volatile type* a, type expected, type v, int, int) { \
    __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                     \
    return expected;                                                                                              \
  }

CRL_ATOMIC_HOOKS(8, uint8_t)
CRL_ATOMIC_HOOKS(16, uint16_t)
CRL_ATOMIC_HOOKS(32, uint32_t)
CRL_ATOMIC_HOOKS(64, uint64_t)
