// The emulated device's interface beyond device.h, for its own files: the configuration of the
// runs, their statistics, the race check's entry points and the device's lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>

#include "emulation/device.h"

namespace crl_emu {

// The order of the ready threads and of the blocks, the byte that fills shared memory and the
// tensors an op allocates, and whether threads switch with ucontext (the portable fallback) rather
// than the fast x86-64 switch.
enum class Order { Forward, Reverse, Random };
struct Config {
  Order order = Order::Forward;
  uint64_t seed = 0;
  int poison = 0xa5;
  bool portable_switch = false;
};
void configure(const Config& config);

struct Statistics {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0, memsets = 0;
};
Statistics read_statistics();

// The race check (racecheck.cpp turns it on and reports each access of the instrumented kernels).
void enable_race_check();
void race_access(const void* address, size_t size, bool write, bool atomic, const void* pc);
void add_race_range(const void* begin, size_t bytes, const char* name);
void release_race_ranges();

// Held by an op on the device for its whole call (the CUDA guard's stand-in).
std::recursive_mutex& mutex();
const Config& current_config();

}  // namespace crl_emu
