// The CUDA device of the op entry points (common/entry_points.h): the stages of cuda/stages.h, the
// device guard and the flag type. cuda_ops.cpp registers it for the CUDA dispatch key; the tests'
// emulated device (csrc/emulation) registers the same struct in a test-only library.
#pragma once

#include <c10/cuda/CUDAGuard.h>

#include "cuda/stages.h"

namespace crl {

struct Cuda {
  using Flag = at::Tensor;  // 0-dim bool on the device: reading it would synchronise

  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };

  static constexpr auto profile = &cuda::profile;
  static constexpr auto check_finite = &cuda::check_finite;
  static constexpr auto nonfinite_checks = &cuda::nonfinite_checks;
  static constexpr auto class_lists = &cuda::class_lists;
  static constexpr auto mine_class = &cuda::mine_class;
  static constexpr auto partner_rows = &cuda::partner_rows;
  static constexpr auto shard_table = &cuda::shard_table;
  static constexpr auto shard_table_backward = &cuda::shard_table_backward;
  static constexpr auto mine_instance = &cuda::mine_instance;
  static constexpr auto check_overflow = &cuda::check_overflow;
  static constexpr auto pair_counts = &cuda::pair_counts;
  static constexpr auto pair_distances = &cuda::pair_distances;
  static constexpr auto pair_distances_backward = &cuda::pair_distances_backward;
  static constexpr auto pair_sums = &cuda::pair_sums;
  static constexpr auto pair_sums_backward = &cuda::pair_sums_backward;
  static constexpr auto loss = &cuda::loss;

  static const at::Tensor& as_tensor(const at::Tensor& flag, const at::Tensor&) { return flag; }
  static constexpr auto loss_backward = &cuda::loss_backward;
  static constexpr auto partial_vector = &cuda::partial_vector;
  static constexpr auto shard_loss = &cuda::shard_loss;
  static constexpr auto shard_loss_backward = &cuda::shard_loss_backward;
};

}  // namespace crl
