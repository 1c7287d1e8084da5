// The emulated CUDA device's execution model (device.h states it): fibers, the scheduler of a
// block, barriers and warp collectives, shared memory, launch limits and error reports, and the
// shared-memory race check that racecheck.cpp feeds.
#include "emulation/runtime.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

// AddressSanitizer's fiber interface, present when the sanitizer runtime is loaded.
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
void __asan_unpoison_memory_region(const volatile void* address, size_t size) __attribute__((weak));
}

#if defined(__x86_64__)
#define CRL_EMU_FAST_SWITCH 1
// Saves the callee-saved registers on the current stack, stores its pointer in *save and continues
// on the stack `load` (System V x86-64; the floating-point control words are never changed by the
// kernels, so they are not switched). A new stack starts in crl_emu_start, which calls r13(r12).
asm(R"(
  .text
  .globl crl_emu_switch
  .hidden crl_emu_switch
  .type crl_emu_switch, @function
crl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size crl_emu_switch, .-crl_emu_switch

  .globl crl_emu_start
  .hidden crl_emu_start
  .type crl_emu_start, @function
crl_emu_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size crl_emu_start, .-crl_emu_start
)");
extern "C" void crl_emu_switch(void** save, void* load);
extern "C" void crl_emu_start();
#endif

uint3 crl_emu::thread_index{0, 0, 0}, crl_emu::block_index{0, 0, 0};
dim3 crl_emu::block_dim{1, 1, 1}, crl_emu::grid_dim{1, 1, 1};

namespace crl_emu {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSharedLimit = 48 * 1024;
constexpr size_t kOptInSharedLimit = 227 * 1024;  // H100 and H200: 227 KiB per block with the opt-in
constexpr int kMain = -1;

Config config;
Statistics statistics;
std::recursive_mutex device_mutex;

// ---- contexts ----------------------------------------------------------------------------------------

struct Context {
  void* sp = nullptr;  // the fast switch
  ucontext_t uc;       // the fallback
  const void* stack = nullptr;  // its lowest address (the main context's: as AddressSanitizer saw it)
  size_t stack_size = 0;
};

Context main_context;
const Context* previous = nullptr;  // the context that switched to the one now running

size_t stack_bytes() {
  // AddressSanitizer's redzones make frames several times larger.
  return __sanitizer_start_switch_fiber != nullptr ? 1024 * 1024 : 128 * 1024;
}

void landed(void* fake_stack) {
  if (__sanitizer_finish_switch_fiber == nullptr) return;
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(fake_stack, &bottom, &size);
  if (previous == &main_context) {
    main_context.stack = bottom;
    main_context.stack_size = size;
  }
}

// The switch in use: the fast one where it exists, else (or when configured) ucontext's.
#if defined(CRL_EMU_FAST_SWITCH)
bool portable_switch = false;
#else
constexpr bool portable_switch = true;
#endif

void switch_context(Context& from, Context& to) {
  void* fake_stack = nullptr;
  if (__sanitizer_start_switch_fiber != nullptr) __sanitizer_start_switch_fiber(&fake_stack, to.stack, to.stack_size);
  previous = &from;
#if defined(CRL_EMU_FAST_SWITCH)
  if (!portable_switch) {
    crl_emu_switch(&from.sp, to.sp);
    landed(fake_stack);
    return;
  }
#endif
  swapcontext(&from.uc, &to.uc);
  landed(fake_stack);
}

// ---- the block's threads ------------------------------------------------------------------------------

enum class State : uint8_t { Ready, Barrier, Collective, Exited };
enum class Kind : uint8_t { SyncThreads, SyncThreadsOr, SyncThreadsAnd, SyncThreadsCount, SyncWarp, Shuffle, Ballot, Match };

const char* kind_name(Kind kind) {
  static constexpr const char* kNames[] = {"__syncthreads", "__syncthreads_or", "__syncthreads_and",
                                           "__syncthreads_count", "__syncwarp", "a shuffle",
                                           "a vote (ballot, any, all)", "__match_any_sync"};
  return kNames[static_cast<int>(kind)];
}

struct Thread {
  State state = State::Ready;
  Kind kind = Kind::SyncThreads;
  Site site{"", 0};
  unsigned mask = 0;
  uint64_t bits = 0;
  int size = 0;  // of a match's value
  Shuffle mode = Shuffle::Index;
  int operand = 0, width = kWarp;
  int predicate = 0;
  uint64_t result = 0;
  uint32_t block_gen = 0, warp_gen = 0;  // barriers passed: the race check's order
};

struct Fiber {
  Context context;
  bool parked = false;  // waiting at the end of a thread, ready to run the same thread of the next block
};

struct LaunchState {
  const char* kernel = "";
  LaunchConfig config{};
  void (*body)(void*) = nullptr;
  void* state = nullptr;
  int threads = 0;
  size_t static_bytes = 0, shared_limit = kDefaultSharedLimit;
  bool opted_in = false;
  uint64_t serial = 0;
};

LaunchState launch;
std::vector<Thread> threads;
std::vector<Fiber> fibers;
std::deque<int> ready;  // the threads that run next, in order
// Per warp, the lanes that wait at a collective and the lanes that have exited (bit l: lane l).
std::vector<uint32_t> warp_waiting, warp_exited;
int current = kMain;
int exited = 0;
uint64_t block_serial = 0, launch_serial = 0;
unsigned char* dynamic_memory = nullptr;
std::mt19937_64 order_random;
std::string failure;  // the first error of the launch
std::unordered_map<const void*, int> max_dynamic_shared;  // kernel entry -> opted-in bytes

std::string position(int thread) {
  std::ostringstream out;
  const unsigned bx = launch.config.block.x, by = launch.config.block.y;
  out << "block [" << block_index.x << "," << block_index.y << "," << block_index.z << "], thread ["
      << thread % bx << "," << (thread / bx) % by << "," << thread / (bx * by) << "]";
  return out.str();
}

// The source line of a code address (the race check's accesses), by addr2line on the library: the
// innermost line outside the emulator's own header (its atomics are inlined into the kernels).
std::string where_is(const void* pc) {
  Dl_info info;
  if (pc == nullptr || dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return "an unknown line";
  const uintptr_t offset = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  char command[4200];
  std::snprintf(command, sizeof(command), "addr2line -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                static_cast<unsigned long>(offset));
  std::string found;
  if (FILE* pipe = popen(command, "r")) {
    char buffer[1024];
    while (std::fgets(buffer, sizeof(buffer), pipe) != nullptr) {
      std::string line(buffer);
      if (!line.empty() && line.back() == '\n') line.pop_back();
      const size_t slash = line.rfind('/');
      if (slash != std::string::npos) line = line.substr(slash + 1);
      if (found.empty() && line.rfind("device.h:", 0) != 0 && line[0] != '?') found = line;
    }
    pclose(pipe);
  }
  return found.empty() ? "an unknown line" : found;
}

std::string where(Site site) {
  const char* slash = std::strrchr(site.file, '/');
  return std::string(slash != nullptr ? slash + 1 : site.file) + ":" + std::to_string(site.line);
}

std::string hex(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", mask);
  return text;
}

// Where a waiting thread waits, for the reports.
std::string waiting_at(int t) {
  const Thread& th = threads[t];
  if (th.state == State::Exited) return "has exited";
  if (th.state == State::Ready) return "is running";
  std::string text = std::string("waits at ") + kind_name(th.kind) + " (" + where(th.site) + ")";
  if (th.state == State::Collective) text += " with mask " + hex(th.mask);
  return text;
}

void set_builtins(int t) {
  const unsigned bx = launch.config.block.x, by = launch.config.block.y;
  thread_index = {static_cast<unsigned>(t) % bx, (static_cast<unsigned>(t) / bx) % by,
                  static_cast<unsigned>(t) / (bx * by)};
}

void fiber_main(void* index);

void fiber_entry(int index) {  // makecontext passes int arguments
  fiber_main(reinterpret_cast<void*>(static_cast<intptr_t>(index)));
}

// Thread t's fiber at the start of fiber_main: its stack mapped once (with a guard page below it),
// its first frame built for the switch in use. Also after a stopped launch abandoned it mid-thread.
void reset_fiber(int t) {
  Fiber& f = fibers[t];
  Context& c = f.context;
  if (c.stack == nullptr) {
    c.stack_size = stack_bytes();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, c.stack_size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) throw std::runtime_error("crl_ops emulated CUDA: cannot map a thread's stack");
    mprotect(memory, page, PROT_NONE);
    c.stack = static_cast<char*>(memory) + page;
  }
  // The redzones of abandoned frames would otherwise stay poisoned.
  if (__asan_unpoison_memory_region != nullptr) __asan_unpoison_memory_region(c.stack, c.stack_size);
  f.parked = false;
  char* const stack = static_cast<char*>(const_cast<void*>(c.stack));
#if defined(CRL_EMU_FAST_SWITCH)
  if (!portable_switch) {
    // The frame crl_emu_switch pops: r15, r14, r13 = entry, r12 = argument, rbx, rbp, return
    // address = crl_emu_start, which then runs with a 16-byte aligned stack.
    const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + c.stack_size) & ~uintptr_t(15);
    uint64_t* frame = reinterpret_cast<uint64_t*>(top - 72);
    std::memset(frame, 0, 72);
    frame[2] = reinterpret_cast<uint64_t>(&fiber_main);
    frame[3] = static_cast<uint64_t>(t);
    frame[6] = reinterpret_cast<uint64_t>(&crl_emu_start);
    c.sp = frame;
    return;
  }
#endif
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = c.stack_size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&fiber_entry), 1, t);
}

// ---- errors ---------------------------------------------------------------------------------------------

[[noreturn]] void stop_launch();

// Records the first error of the launch and stops it (from a thread) or returns (from the host).
void report(const std::string& what) {
  if (failure.empty()) {
    std::string name = launch.kernel;
    const size_t with = name.find("Kernel = ");
    if (with != std::string::npos) name = name.substr(with + 9, name.size() - with - 10);
    failure = "crl_ops emulated CUDA: " + what + " [kernel " + name + ", launched at " + where(launch.config.site) + "]";
  }
}

[[noreturn]] void fail(const std::string& what) {
  report(what);
  stop_launch();
}

// ---- the scheduler ------------------------------------------------------------------------------------

template <typename Id>
void order(std::vector<Id>& ids) {
  if (config.order == Order::Reverse) {
    std::reverse(ids.begin(), ids.end());
  } else if (config.order == Order::Random) {
    std::shuffle(ids.begin(), ids.end(), order_random);
  }
}

bool same_collective(const Thread& a, const Thread& b) {
  return a.kind == b.kind && a.mask == b.mask && (a.kind != Kind::Shuffle || (a.mode == b.mode && a.width == b.width)) &&
         (a.kind != Kind::Match || a.size == b.size);
}

// Completes the collective that thread `waiter` waits at if every lane of its mask has arrived:
// the lanes get their results and go to the front of the ready queue (the warp goes on before
// other warps run, as warps progress independently on a GPU). False while lanes are missing; a
// mask that cannot complete is an error.
bool complete_collective(int waiter) {
  const int n = launch.threads, base = waiter - waiter % kWarp, l = waiter % kWarp;
  const int lanes = std::min(kWarp, n - base);
  const Thread& t = threads[waiter];
  const unsigned mask = t.mask;
  const auto what = [&] {  // only for a report: formatting costs more than the check
    return position(waiter) + ": " + kind_name(t.kind) + " at " + where(t.site) + " with mask " + hex(mask);
  };
  if (((mask >> l) & 1u) == 0) fail(what() + ", which does not name the calling lane " + std::to_string(l));
  const int warp = waiter / kWarp;
  const uint32_t present = lanes == kWarp ? ~0u : (1u << lanes) - 1u;
  if ((mask & ~present) != 0) {
    fail(what() + " names lane " + std::to_string(__builtin_ctz(mask & ~present)) + ", past the block's " +
         std::to_string(n) + " threads");
  }
  if ((mask & warp_exited[warp]) != 0) {
    fail(what() + " names lane " + std::to_string(__builtin_ctz(mask & warp_exited[warp])) + ", which has exited");
  }
  if ((mask & ~warp_waiting[warp]) != 0) return false;  // lanes still on their way
  for (int m = 0; m < kWarp; ++m) {
    if (((mask >> m) & 1u) != 0 && !same_collective(t, threads[base + m])) {
      fail(what() + " names lane " + std::to_string(m) + ", which " + waiting_at(base + m));
    }
  }
  unsigned votes = 0;
  for (int m = 0; m < kWarp; ++m) {
    if (((mask >> m) & 1u) != 0 && threads[base + m].predicate != 0) votes |= 1u << m;
  }
  static std::vector<int> released;  // reused: a collective completes every few switches
  released.clear();
  for (int m = 0; m < kWarp; ++m) {
    if (((mask >> m) & 1u) == 0) continue;
    Thread& u = threads[base + m];
    if (t.kind == Kind::Ballot) {
      u.result = votes;
    } else if (t.kind == Kind::Match) {
      unsigned same = 0;
      for (int o = 0; o < kWarp; ++o) {
        if (((mask >> o) & 1u) != 0 && threads[base + o].bits == u.bits) same |= 1u << o;
      }
      u.result = same;
    } else if (t.kind == Kind::Shuffle) {
      const int width = u.width, segment = m - m % width;
      int source = m;
      if (u.mode == Shuffle::Index) {
        source = segment + ((u.operand % width) + width) % width;
      } else if (u.mode == Shuffle::Up) {
        source = m % width >= u.operand ? m - u.operand : m;
      } else if (u.mode == Shuffle::Down) {
        source = m % width + u.operand < width ? m + u.operand : m;
      } else {
        source = m ^ u.operand;
        if (source / width != m / width) source = m;
      }
      if (source < 0 || source >= kWarp || ((mask >> source) & 1u) == 0) {
        fail(position(base + m) + ": a shuffle at " + where(u.site) + " reads lane " + std::to_string(source) +
             ", which its mask " + hex(mask) + " does not name");
      }
      u.result = threads[base + source].bits;
    }
    released.push_back(base + m);
  }
  for (int r : released) {
    threads[r].state = State::Ready;
    ++threads[r].warp_gen;
  }
  warp_waiting[warp] &= ~mask;
  order(released);
  ready.insert(ready.begin(), released.begin(), released.end());
  return true;
}

// Completes every collective whose lanes have all arrived; false when none could.
bool complete_collectives() {
  bool any = false;
  for (int t = 0; t < launch.threads; ++t) {
    if (threads[t].state == State::Collective) any |= complete_collective(t);
  }
  return any;
}

// Completes the block barrier when every thread waits at it; false when it cannot complete yet.
bool complete_barrier() {
  const int n = launch.threads;
  int first = -1;
  for (int t = 0; t < n; ++t) {
    if (threads[t].state == State::Collective) return false;
    if (threads[t].state == State::Barrier && first < 0) first = t;
  }
  if (first < 0) return false;
  const Thread& b = threads[first];
  int total = 0;
  for (int t = 0; t < n; ++t) {
    const Thread& th = threads[t];
    if (th.state == State::Exited) {
      fail(position(t) + " has exited, and never reaches " + kind_name(b.kind) + " at " + where(b.site) +
           ", where " + position(first) + " waits");
    }
    if (th.site.line != b.site.line || std::strcmp(th.site.file, b.site.file) != 0 || th.kind != b.kind) {
      fail("the block's threads wait at different barriers: " + position(first) + " at " + kind_name(b.kind) + " (" +
           where(b.site) + "), " + position(t) + " at " + kind_name(th.kind) + " (" + where(th.site) + ")");
    }
    total += th.predicate != 0;
  }
  const int result = b.kind == Kind::SyncThreadsOr ? total > 0 : (b.kind == Kind::SyncThreadsAnd ? total == n : total);
  std::vector<int> released(n);
  for (int t = 0; t < n; ++t) {
    threads[t].state = State::Ready;
    threads[t].result = static_cast<uint64_t>(result);
    ++threads[t].block_gen;
    ++threads[t].warp_gen;
    released[t] = t;
  }
  order(released);
  ready.insert(ready.end(), released.begin(), released.end());
  return true;
}

[[noreturn]] void deadlock() {
  // A collective that waits for a lane blocked elsewhere names it.
  for (int t = 0; t < launch.threads; ++t) {
    const Thread& th = threads[t];
    if (th.state != State::Collective) continue;
    const int base = t - t % kWarp;
    for (int m = 0; m < kWarp; ++m) {
      if (((th.mask >> m) & 1u) != 0 && threads[base + m].state != State::Collective) {
        fail("deadlock: " + position(t) + ": " + kind_name(th.kind) + " at " + where(th.site) + " with mask " +
             hex(th.mask) + " names lane " + std::to_string(m) + ", which " + waiting_at(base + m));
      }
    }
  }
  std::string text = "deadlock: no barrier or collective can complete;";
  int shown = 0;
  for (int t = 0; t < launch.threads && shown < 4; ++t) {
    if (threads[t].state == State::Exited) continue;
    text += (shown++ ? "; " : " ") + position(t) + " " + waiting_at(t);
  }
  fail(text);
}

// The next thread to run, or kMain when the block is done.
int next_ready() {
  for (;;) {
    if (!ready.empty()) {
      const int next = ready.front();
      ready.pop_front();
      return next;
    }
    if (exited == launch.threads) return kMain;
    if (complete_collectives() || complete_barrier()) continue;
    deadlock();
  }
}

Context& context_of(int t) {
  return t == kMain ? main_context : fibers[t].context;
}

// Runs the next ready thread (the current one has just blocked or exited).
void reschedule() {
  const int from = current;
  const int next = next_ready();
  if (next == from) return;
  if (next != kMain) set_builtins(next);
  current = next;
  ++statistics.switches;
  switch_context(context_of(from), context_of(next));
}

[[noreturn]] void stop_launch() {
  if (current == kMain) throw std::runtime_error(failure);  // reported by the host side of a launch
  const int from = current;
  current = kMain;
  for (Fiber& f : fibers) f.parked = false;  // abandoned mid-thread: rebuilt before their next use
  switch_context(context_of(from), main_context);
  std::abort();  // never resumed
}

void fiber_main(void* index) {
  const int t = static_cast<int>(reinterpret_cast<intptr_t>(index));
  landed(nullptr);
  for (;;) {
    launch.body(launch.state);
    threads[t].state = State::Exited;
    warp_exited[t / kWarp] |= 1u << (t % kWarp);
    ++exited;
    fibers[t].parked = true;
    reschedule();  // resumed only to run thread t of another block
  }
}

// The thread that runs now (a barrier or collective called from the host is a logic error).
Thread& calling_thread() {
  if (current == kMain) throw std::logic_error("crl_ops emulated CUDA: a device function was called from the host");
  return threads[current];
}

// Blocks the current thread at a barrier or collective and returns its result.
uint64_t wait(State state, Kind kind, Site site) {
  Thread& t = calling_thread();
  t.state = state;
  t.kind = kind;
  t.site = site;
  if (state == State::Collective) {
    warp_waiting[current / kWarp] |= 1u << (current % kWarp);
    complete_collective(current);
  }
  reschedule();
  return threads[current].result;
}

void run_block(uint64_t block) {
  const unsigned gx = launch.config.grid.x, gy = launch.config.grid.y;
  block_index = {static_cast<unsigned>(block % gx), static_cast<unsigned>((block / gx) % gy),
                 static_cast<unsigned>(block / (uint64_t(gx) * gy))};
  ++block_serial;
  ++statistics.blocks;
  const int n = launch.threads;
  for (int t = 0; t < n; ++t) {
    threads[t] = Thread();
    if (!fibers[t].parked) reset_fiber(t);
  }
  std::memset(dynamic_memory, config.poison, launch.config.shared);
  release_race_ranges();
  if (launch.config.shared > 0) add_race_range(dynamic_memory, launch.config.shared, "dynamic shared memory");
  exited = 0;
  const int warps = (n + kWarp - 1) / kWarp;
  warp_waiting.assign(warps, 0u);
  warp_exited.assign(warps, 0u);
  std::vector<int> all(n);
  for (int t = 0; t < n; ++t) all[t] = t;
  order(all);
  ready.assign(all.begin(), all.end());
  current = next_ready();
  set_builtins(current);
  switch_context(main_context, context_of(current));
}

// A launch against the limits of the device (from the host: reports, the caller raises).
void check_launch(const LaunchConfig& c, const void* entry) {
  const uint64_t threads_per_block = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (threads_per_block == 0 || threads_per_block > kMaxThreads || c.block.x > 1024 || c.block.y > 1024 ||
      c.block.z > 64) {
    return report("invalid launch: a block of " + std::to_string(c.block.x) + " x " + std::to_string(c.block.y) + " x " +
         std::to_string(c.block.z) + " threads (at most 1024, and 1024 x 1024 x 64 per dimension)");
  }
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535) {
    return report("invalid launch: a grid of " + std::to_string(c.grid.x) + " x " + std::to_string(c.grid.y) + " x " +
         std::to_string(c.grid.z) + " blocks (each at least 1; at most 2^31 - 1 x 65535 x 65535)");
  }
  const auto opt_in = max_dynamic_shared.find(entry);
  launch.opted_in = opt_in != max_dynamic_shared.end();
  launch.shared_limit = launch.opted_in ? kOptInSharedLimit : kDefaultSharedLimit;
  const size_t dynamic_limit = launch.opted_in ? static_cast<size_t>(opt_in->second) : kDefaultSharedLimit;
  if (c.shared > dynamic_limit) {
    return report("invalid launch: " + std::to_string(c.shared) + " bytes of dynamic shared memory, above the " +
         std::to_string(dynamic_limit) + " the kernel may use" +
         (launch.opted_in ? " (its cudaFuncSetAttribute)" : " without cudaFuncSetAttribute"));
  }
}

}  // namespace

// ---- the interface of device.h ----------------------------------------------------------------------------

void run_grid(const char* kernel, const void* entry, const LaunchConfig& c, void (*body)(void*), void* state) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex);
  if (current != kMain) throw std::logic_error("crl_ops emulated CUDA: a launch from device code");
  failure.clear();
  launch = LaunchState();
  launch.kernel = kernel;
  launch.config = c;
  launch.body = body;
  launch.state = state;
  launch.serial = ++launch_serial;
  ++statistics.launches;
  check_launch(c, entry);
  if (!failure.empty()) throw std::runtime_error(failure);
  launch.threads = static_cast<int>(c.block.x * c.block.y * c.block.z);
  block_dim = c.block;
  grid_dim = c.grid;
  if (threads.size() < static_cast<size_t>(launch.threads)) threads.resize(launch.threads);
  if (fibers.size() < static_cast<size_t>(launch.threads)) {
    fibers.resize(launch.threads);
    for (Fiber& f : fibers) f.parked = false;  // a moved ucontext_t points into its old place
  }
  // The dynamic shared memory: exactly its size (AddressSanitizer sees any access past it).
  dynamic_memory = static_cast<unsigned char*>(std::malloc(std::max<size_t>(c.shared, 1)));
  const uint64_t blocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  order_random.seed(config.seed * 1000003u + launch.serial);
  std::vector<uint64_t> block_order;
  if (config.order != Order::Forward) {
    block_order.resize(blocks);
    for (uint64_t b = 0; b < blocks; ++b) block_order[b] = b;
    order(block_order);
  }
  for (uint64_t b = 0; b < blocks && failure.empty(); ++b) run_block(block_order.empty() ? b : block_order[b]);
  statistics.threads += blocks * static_cast<uint64_t>(launch.threads);
  release_race_ranges();
  std::free(dynamic_memory);
  dynamic_memory = nullptr;
  if (!failure.empty()) throw std::runtime_error(failure);
}

void syncthreads(Site site) {
  wait(State::Barrier, Kind::SyncThreads, site);
}

int syncthreads_reduce(Site site, int kind, int predicate) {
  calling_thread().predicate = predicate;
  const Kind k = kind == 0 ? Kind::SyncThreadsOr : (kind == 1 ? Kind::SyncThreadsAnd : Kind::SyncThreadsCount);
  return static_cast<int>(wait(State::Barrier, k, site));
}

namespace {
uint64_t collective(Kind kind, Site site, unsigned mask) {
  calling_thread().mask = mask;
  return wait(State::Collective, kind, site);
}
}  // namespace

void syncwarp(Site site, unsigned mask) {
  collective(Kind::SyncWarp, site, mask);
}

uint64_t shuffle(Site site, unsigned mask, uint64_t bits, Shuffle mode, int operand, int width) {
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) {
    fail(position(current) + ": a shuffle at " + where(site) + " with width " + std::to_string(width) +
         " (a power of 2 up to 32)");
  }
  Thread& t = calling_thread();
  t.bits = bits;
  t.mode = mode;
  t.operand = operand;
  t.width = width;
  return collective(Kind::Shuffle, site, mask);
}

unsigned ballot(Site site, unsigned mask, int predicate) {
  calling_thread().predicate = predicate;
  return static_cast<unsigned>(collective(Kind::Ballot, site, mask));
}

unsigned match_any(Site site, unsigned mask, uint64_t bits, int size) {
  Thread& t = calling_thread();
  t.bits = bits;
  t.size = size;
  return static_cast<unsigned>(collective(Kind::Match, site, mask));
}

void* static_shared(SharedSlot& slot, size_t bytes, const char* name, Site site) {
  if (slot.data == nullptr) {
    slot.data = std::malloc(bytes);  // exactly its size, for AddressSanitizer
  }
  if (slot.launch != launch.serial) {  // first use in this launch: it counts towards the limit
    slot.launch = launch.serial;
    launch.static_bytes += bytes;
    if (launch.static_bytes + launch.config.shared > launch.shared_limit) {
      fail(position(current) + ": " + std::to_string(launch.static_bytes) + " bytes of static shared memory (" + name +
           " at " + where(site) + " the last) and " + std::to_string(launch.config.shared) +
           " dynamic: above the " + std::to_string(launch.shared_limit) + " a block may use" +
           (launch.opted_in ? "" : " without cudaFuncSetAttribute"));
    }
  }
  if (slot.block != block_serial) {
    slot.block = block_serial;
    std::memset(slot.data, config.poison, bytes);
    add_race_range(slot.data, bytes, name);
  }
  return slot.data;
}

void* dynamic_shared() {
  return dynamic_memory;
}

void device_assert(const char* message, Site site, const char* function) {
  std::string text = "device-side assert triggered: " + where(site) + ": " + function + ": " + position(current) +
                     " Assertion `" + message + "` failed.";
  std::fprintf(stderr, "%s\n", text.c_str());
  fail(text);
}

cudaError_t set_max_dynamic_shared(const void* entry, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kOptInSharedLimit) return cudaErrorInvalidValue;
  max_dynamic_shared[entry] = bytes;
  return cudaSuccess;
}

void configure(const Config& c) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex);
#if defined(CRL_EMU_FAST_SWITCH)
  if (c.portable_switch != portable_switch) {
    portable_switch = c.portable_switch;
    for (Fiber& f : fibers) f.parked = false;  // rebuilt for the other switch before their next use
  }
#endif
  config = c;
}

void count_memset() { ++statistics.memsets; }

Statistics read_statistics() {
  return statistics;
}

const Config& current_config() {
  return config;
}

std::recursive_mutex& mutex() {
  return device_mutex;
}

// ---- the race check of shared memory --------------------------------------------------------------------
// As a racecheck tool does: two accesses by different threads to the same byte of shared memory,
// at least one a write and not both atomic, race unless a barrier orders them: a __syncthreads
// between them, or for two lanes of one warp a __syncwarp or a warp collective. Every thread
// passes the same barriers, so the barriers a thread has passed order its accesses.

namespace {

bool race_check = false;

struct Access {
  int thread = -1;
  uint32_t block_gen = 0, warp_gen = 0;
  bool atomic = false;
  const void* pc = nullptr;
};

struct Cell {
  uint64_t block = 0;  // the block whose accesses these are
  Access writer, readers[2];
};

struct RaceRange {
  const unsigned char* begin;
  size_t bytes;
  const char* name;
  std::vector<Cell>* cells;
};

std::vector<RaceRange> race_ranges;
std::unordered_map<const void*, std::vector<Cell>> race_cells;  // per allocation

// Whether `earlier` is ordered before an access now by thread `t`.
bool ordered(const Access& earlier, int t) {
  if (earlier.thread < 0 || earlier.thread == t) return true;
  const Thread& now = threads[t];
  return now.block_gen > earlier.block_gen || (now.warp_gen > earlier.warp_gen && now.block_gen == earlier.block_gen &&
                                               earlier.thread / kWarp == t / kWarp);
}

std::string access_text(const char* what, int thread, const void* pc) {
  return position(thread) + " " + what + " it at " + where_is(pc);
}

[[noreturn]] void race(const RaceRange& range, size_t offset, const Access& earlier, bool earlier_writes,
                       bool now_writes, const void* pc) {
  fail(std::string("race on shared memory: ") + range.name + " (byte " + std::to_string(offset) + "): " +
       access_text(earlier_writes ? "writes" : "reads", earlier.thread, earlier.pc) + ", " +
       access_text(now_writes ? "writes" : "reads", current, pc) + ", with no barrier between them");
}

}  // namespace

void add_race_range(const void* begin, size_t bytes, const char* name) {
  if (!race_check || bytes == 0) return;
  std::vector<Cell>& cells = race_cells[begin];
  if (cells.size() < bytes) cells.resize(bytes);
  race_ranges.push_back({static_cast<const unsigned char*>(begin), bytes, name, &cells});
}

void release_race_ranges() {
  race_ranges.clear();
}

void enable_race_check() {
  race_check = true;
}

void race_access(const void* address, size_t size, bool write, bool atomic, const void* pc) {
  if (!race_check || current == kMain) return;
  const unsigned char* a = static_cast<const unsigned char*>(address);
  for (const RaceRange& range : race_ranges) {
    if (a < range.begin || a >= range.begin + range.bytes) continue;
    const size_t first = a - range.begin, last = std::min(range.bytes, first + size);
    const Thread& now = threads[current];
    for (size_t offset = first; offset < last; ++offset) {
      Cell& cell = (*range.cells)[offset];
      if (cell.block != block_serial) cell = Cell{block_serial, {}, {}};
      const Access here{current, now.block_gen, now.warp_gen, atomic, pc};
      if (!ordered(cell.writer, current) && !(atomic && cell.writer.atomic)) race(range, offset, cell.writer, true, write, pc);
      if (write) {
        for (const Access& reader : cell.readers) {
          if (!ordered(reader, current) && !(atomic && reader.atomic)) race(range, offset, reader, false, true, pc);
        }
        cell.writer = here;
      } else if (cell.readers[0].thread == current) {
        cell.readers[0] = here;
      } else {
        cell.readers[1] = cell.readers[0];
        cell.readers[0] = here;
      }
    }
    return;
  }
}

void note_atomic(const void* address, size_t size) {
  race_access(address, size, true, true, __builtin_return_address(0));
}

}  // namespace crl_emu
