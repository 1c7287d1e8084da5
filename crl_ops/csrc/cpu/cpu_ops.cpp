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
  static constexpr auto nonfinite_checks = &cpu::nonfinite_checks;
  static constexpr auto class_lists = &cpu::class_lists;
  static constexpr auto mine_class = &cpu::mine_class;
  static constexpr auto partner_rows = &cpu::partner_rows;
  static constexpr auto shard_table = &cpu::shard_table;
  static constexpr auto shard_table_backward = &cpu::shard_table_backward;
  static constexpr auto mine_instance = &cpu::mine_instance;
  static constexpr auto pair_counts = &cpu::pair_counts;
  static constexpr auto pair_distances = &cpu::pair_distances;
  static constexpr auto pair_distances_backward = &cpu::pair_distances_backward;
  static constexpr auto pair_sums = &cpu::pair_sums;
  static constexpr auto pair_sums_backward = &cpu::pair_sums_backward;
  static constexpr auto loss = &cpu::loss;
  static constexpr auto loss_backward = &cpu::loss_backward;
  static constexpr auto partial_vector = &cpu::partial_vector;
  static constexpr auto shard_loss = &cpu::shard_loss;
  static constexpr auto shard_loss_backward = &cpu::shard_loss_backward;

  static at::Tensor as_tensor(bool flag, const at::Tensor& like) {
    return at::scalar_tensor(flag, like.options().dtype(at::kBool));
  }

  static void check_overflow(bool overflow, at::ScalarType type) {
    TORCH_CHECK_VALUE(!overflow, overflow_message(type));
  }
};

}  // namespace
}  // namespace crl

TORCH_LIBRARY_IMPL(crl_ops, CPU, m) {
  crl::register_entry_points<crl::Cpu>(m);
}
