// The test-only library of the emulated CUDA device: the op schemas under the namespace
// crl_ops_emulated, whose CPU kernels are the CUDA entry points (cuda/cuda_device.h) with CPU
// tensors standing for device memory, and the ops that configure the emulator and read its
// statistics. The installed package never builds or registers this file.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/entry_points.h"
#include "common/op_schemas.h"
#include "cuda/cuda_device.h"
#include "emulation/runtime.h"

namespace crl_emu {
namespace {

// Every tensor allocated during an op call is filled with the poison byte: a kernel that reads an
// output or scratch entry it never wrote gets the poison instead of a lucky zero.
class PoisoningAllocator final : public c10::Allocator {
 public:
  explicit PoisoningAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr data = base_->allocate(bytes);
    if (bytes > 0) std::memset(data.get(), current_config().poison, bytes);
    return data;
  }

  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }

  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }

 private:
  c10::Allocator* base_;
};

constexpr uint8_t kAllocatorPriority = 255;  // above any other; the original returns with it
int op_depth = 0;
c10::Allocator* original = nullptr;

Order parse_order(c10::string_view order) {
  if (order == "forward") return Order::Forward;
  if (order == "reverse") return Order::Reverse;
  TORCH_CHECK_VALUE(order == "random", "crl_ops_emulated::configure: order must be 'forward', 'reverse' or 'random', got '",
                    order, "'");
  return Order::Random;
}

void configure_op(c10::string_view order, int64_t seed, int64_t poison, c10::string_view switch_) {
  TORCH_CHECK_VALUE(poison >= 0 && poison <= 255, "crl_ops_emulated::configure: poison must be a byte (0..255), got ",
                    poison);
  TORCH_CHECK_VALUE(switch_ == "fast" || switch_ == "ucontext",
                    "crl_ops_emulated::configure: switch must be 'fast' or 'ucontext', got '", switch_, "'");
  configure(Config{parse_order(order), static_cast<uint64_t>(seed), static_cast<int>(poison), switch_ == "ucontext"});
}

std::vector<int64_t> statistics_op() {
  const Statistics s = read_statistics();
  return {static_cast<int64_t>(s.launches), static_cast<int64_t>(s.blocks), static_cast<int64_t>(s.threads),
          static_cast<int64_t>(s.switches), static_cast<int64_t>(s.memsets)};
}

}  // namespace

void enter_op() {
  mutex().lock();
  if (op_depth++ == 0) {
    original = c10::GetCPUAllocator();
    static PoisoningAllocator poisoning(original);
    c10::SetCPUAllocator(&poisoning, kAllocatorPriority);
  }
}

void leave_op() {
  if (--op_depth == 0) c10::SetCPUAllocator(original, kAllocatorPriority);
  mutex().unlock();
}

}  // namespace crl_emu

TORCH_LIBRARY(crl_ops_emulated, m) {
  crl::define_op_schemas(m);
  // configure(order, seed, poison, switch): the thread and block order of the following launches
  // ('forward', 'reverse' or 'random' with the seed), the poison byte and the context switch
  // ('fast', or the portable 'ucontext'); statistics(): launches, blocks, threads, thread switches
  // and memsets so far.
  m.def("configure(str order, int seed, int poison, str switch='fast') -> ()", &crl_emu::configure_op);
  m.def("statistics() -> int[]", &crl_emu::statistics_op);
}

TORCH_LIBRARY_IMPL(crl_ops_emulated, CPU, m) {
  crl::register_entry_points<crl::Cuda>(m);
}
