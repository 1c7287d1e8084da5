// The CUDA stages behind the op entry points (common/entry_points.h), at the level of tensors, as
// the CPU's cpu/cpu_kernels.h: cuda_ops.cpp binds them into the `Cuda` device. Arguments arrive
// checked (common/op_checks.h) with labels, num_classes and active contiguous; features and
// logits in any layout (read in place). Nothing here synchronises with the host: flags are 0-dim
// bool tensors on the device, and validate=True failures are device-side assertions.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/crl_math.h"
#include "common/shard_loss.h"

namespace crl {
namespace cuda {

using at::Tensor;

// Section 1 (profile.cu, profile_ops.cpp). validate: a device-side assertion for a label outside
// -1..C_j-1; otherwise such a label counts as not annotated.
std::tuple<Tensor, Tensor, Tensor> profile(const Tensor& labels, const Tensor& num_classes, int64_t max_classes,
                                           double threshold, bool validate);

// Section 2 (mining.cu, mining_ops.cpp): class_lists and partner_rows as the CPU's; for the anchor rows
// first..first + rows against all B candidates: (anchors [R, A], partners [R, A, 2K]) and, for instance mining, whether the
// squared distance of a mined pair overflowed (0-dim bool).
std::tuple<Tensor, Tensor> class_lists(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                       const Tensor& active, int64_t k);
std::tuple<Tensor, Tensor> mine_class(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                      const Tensor& active, int64_t k, int64_t first, int64_t rows);
std::tuple<Tensor, Tensor> partner_rows(const Tensor& lists, const Tensor& labels, const Tensor& num_classes,
                                        const Tensor& active, int64_t first, int64_t rows);
// Class mode's partner table under crl_ops.distributed (pairs.cu): as cpu::shard_table and
// cpu::shard_table_backward, one kernel each (the backward gathers each entry's additions in the
// CPU's order).
Tensor shard_table(const Tensor& vectors, const Tensor& lists, int64_t first);
Tensor shard_table_backward(const Tensor& grad_table, const Tensor& grad_rows, const Tensor& lists, int64_t first,
                            const Tensor& grad_scale);
std::tuple<Tensor, Tensor, Tensor> mine_instance(const Tensor& features, const Tensor& logits, const Tensor& labels,
                                                 const Tensor& num_classes, const Tensor& active, int64_t k,
                                                 int64_t first, int64_t rows);

// Section 6 (values.cu): whether the features (when defined) and the logits of each attribute's
// classes are finite (0-dim bool); validate: a device-side assertion where not. check_overflow:
// the assertion of an overflowing mined pair (flag from mine_instance).
Tensor check_finite(const Tensor& features, const Tensor& logits, const Tensor& num_classes, bool validate);
Tensor nonfinite_checks(const Tensor& features, const Tensor& logits, const Tensor& num_classes);
void check_overflow(const Tensor& overflow, at::ScalarType accumulation);

// Section 3 (losses.cu): as cpu::pair_counts, cpu::loss and cpu::loss_backward, with `finite` a
// 0-dim bool tensor.
Tensor pair_counts(const Tensor& anchors, const Tensor& partners);

// The pair ops (pairs.cu, pairs_ops.cpp): as cpu::pair_distances (the overflow flag a 0-dim bool
// tensor), pair_distances_backward (float atomics: refused under deterministic algorithms),
// pair_sums and pair_sums_backward.
std::tuple<Tensor, Tensor> pair_distances(const Tensor& vectors, const Tensor& partners, int64_t first);
Tensor pair_distances_backward(const Tensor& grad, const Tensor& vectors, const Tensor& partners,
                               const Tensor& distances, int64_t first);
Tensor pair_sums(const Tensor& distances, const Tensor& partners, const Tensor& margins, const Tensor& longest,
                 Form form, double apc_margin, int64_t bins);
std::tuple<Tensor, Tensor> pair_sums_backward(const Tensor& grad, const Tensor& distances, const Tensor& partners,
                                              const Tensor& margins, const Tensor& longest, Form form,
                                              double apc_margin, int64_t bins, bool margins_grad);

struct LossOutputs {
  Tensor loss, distances, sums, histograms;
};

LossOutputs loss(const Tensor& features, const Tensor& partners, const Tensor& margins, const Tensor& pair_counts,
                 Form form, double apc_margin, int64_t bins, Reduction reduction, bool validate,
                 const Tensor& finite);

std::tuple<Tensor, Tensor> loss_backward(const Tensor& grad, const Tensor& loss, const Tensor& features,
                                         const Tensor& partners, const Tensor& distances, const Tensor& margins,
                                         const Tensor& pair_counts, const Tensor& sums, const Tensor& histograms,
                                         Form form, double apc_margin, int64_t bins, Reduction reduction,
                                         bool margins_grad);

// crl_ops.distributed's partial vector and finishing step (losses.cu): as cpu::partial_vector and
// cpu::shard_loss, one kernel each (and one for the backward), the value errors device-side assertions.
Tensor partial_vector(const Tensor& sums, const Tensor& pair_counts, const Tensor& overflow, const Tensor& checks,
                      const PartialLayout& layout);
std::tuple<Tensor, Tensor, Tensor> shard_loss(const Tensor& total, const PartialLayout& layout, Reduction reduction,
                                              at::ScalarType dtype, int64_t world_size, bool validate);
Tensor shard_loss_backward(const Tensor& grad, const Tensor& total, const PartialLayout& layout, Reduction reduction,
                           at::ScalarType dtype);

}  // namespace cuda
}  // namespace crl
