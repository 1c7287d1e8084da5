// The CPU device of the op entry points (common/entry_points.h) and its registration.
#include <torch/library.h>

#include "common/entry_points.h"
#include "cpu/cpu_kernels.h"

namespace crl {
namespace {

struct Cpu {
  using Flag = bool;

  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static constexpr auto profile = &cpu::profile;
  static constexpr auto check_finite = &cpu::check_finite;
  static constexpr auto mine_class = &cpu::mine_class;
  static constexpr auto mine_instance = &cpu::mine_instance;
  static constexpr auto pair_counts = &cpu::pair_counts;
  static constexpr auto loss = &cpu::loss;
  static constexpr auto loss_backward = &cpu::loss_backward;

  static void check_overflow(bool overflow, at::ScalarType type) {
    TORCH_CHECK_VALUE(!overflow, overflow_message(type));
  }
};

}  // namespace
}  // namespace crl

TORCH_LIBRARY_IMPL(crl_ops, CPU, m) {
  crl::register_entry_points<crl::Cpu>(m);
}
