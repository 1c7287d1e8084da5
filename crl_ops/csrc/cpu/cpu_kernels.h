// The CPU kernels behind the entry points (common/entry_points.h): the `Cpu` device of that glue.
// Arguments arrive checked (common/op_checks.h). Parallel with at::parallel_for; every
// floating-point sum has a fixed order that does not depend on the thread count, so results
// (gradients included) are bitwise reproducible.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "common/crl_math.h"
#include "common/op_checks.h"

namespace crl {
namespace cpu {

using at::Tensor;

// Grain size of a parallel loop whose items cost about `work` elementary steps each: small
// problems stay on one thread, where waking the pool would cost more than the work.
inline int64_t grain_for(int64_t work) {
  constexpr int64_t kTaskWork = 1 << 15;
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(work, 1));
}

// Section 1. With validate, raises ValueError for the first label (in row-major order) outside
// -1..C_j-1; without, such a label counts as not annotated.
std::tuple<Tensor, Tensor, Tensor> profile(const Tensor& labels, const Tensor& num_classes, int64_t max_classes,
                                           double threshold, bool validate);

// Whether the features (when defined) and the logits of each attribute's classes are all finite.
// With validate, raises ValueError naming the first of them that is not.
bool check_finite(const Tensor& features, const Tensor& logits, const Tensor& num_classes, bool validate);
// checks [2] bool: whether some logit is not finite, and whether some logit or feature (when
// defined) is not: crl_ops.distributed's flags of a rank's own rows, raised after the all-reduce.
Tensor nonfinite_checks(const Tensor& features, const Tensor& logits, const Tensor& num_classes);

// Section 2, class level, before the anchors: for every (attribute, class c < C_j; only the
// active ones where active [A, Cmax] is defined) the K hardest
// positives and negatives among all rows, (keys p(c) [A, Cmax, 2K], indices [A, Cmax, 2K]), best
// first, index -1 and key +inf (positives) or -inf (negatives) where there are fewer.
std::tuple<Tensor, Tensor> class_lists(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                       const Tensor& active, int64_t k);
// Section 2 for the anchor rows first..first + rows: (anchors [R, A], partners [R, A, 2K]).
std::tuple<Tensor, Tensor> mine_class(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                      const Tensor& active, int64_t k, int64_t first, int64_t rows);
// Class mode's rows under crl_ops.distributed, for the anchor rows first..first + rows of the
// gathered labels [N, A]: (anchors [R, A], partners [R, A, 2K] as rows of [own rows; table]) from
// the class lists [A, Cmax, 2K] (write_partner_row).
std::tuple<Tensor, Tensor> partner_rows(const Tensor& lists, const Tensor& labels, const Tensor& num_classes,
                                        const Tensor& active, int64_t first, int64_t rows);
// The partner table [Cmax 2K, A, D] of this rank's rows first.. of vectors [R, Ax, D] (table_source),
// 0 elsewhere; its backward: (grad_rows [R, Ax, D] plus the table's gradient at this rank's entries,
// added in attribute then slot order) times grad_scale (0-dim).
Tensor shard_table(const Tensor& vectors, const Tensor& lists, int64_t first);
Tensor shard_table_backward(const Tensor& grad_table, const Tensor& grad_rows, const Tensor& lists, int64_t first,
                            const Tensor& grad_scale);
// Also whether the squared distance of a mined pair overflowed.
std::tuple<Tensor, Tensor, bool> mine_instance(const Tensor& features, const Tensor& logits, const Tensor& labels,
                                               const Tensor& num_classes, const Tensor& active, int64_t k,
                                               int64_t first, int64_t rows);

// pair_counts [A, 4] of anchors [B, A] and partners [B, A, 2K].
Tensor pair_counts(const Tensor& anchors, const Tensor& partners);

// Section 3 on given pairs (the ops of ops.cpp): distances from the anchor rows first..first + R of
// vectors [N, Ax, D] to their partners [R, A, 2K], and whether a squared distance overflowed.
std::tuple<Tensor, bool> pair_distances(const Tensor& vectors, const Tensor& partners, int64_t first);
Tensor pair_distances_backward(const Tensor& grad, const Tensor& vectors, const Tensor& partners,
                               const Tensor& distances, int64_t first);
// The per-attribute sums of a form (relative, absolute [A, 2]; distribution [A, 2, bins] on the
// nodes over [0, longest_j]) and the backward of a gradient of them.
Tensor pair_sums(const Tensor& distances, const Tensor& partners, const Tensor& margins, const Tensor& longest,
                 Form form, double apc_margin, int64_t bins);
std::tuple<Tensor, Tensor> pair_sums_backward(const Tensor& grad, const Tensor& distances, const Tensor& partners,
                                              const Tensor& margins, const Tensor& longest, Form form,
                                              double apc_margin, int64_t bins, bool margins_grad);

struct LossOutputs {
  Tensor loss, distances, sums, histograms;
};

// Section 3 on the mined pairs. With validate, raises ValueError where a pair's squared distance
// overflows; without, that or !finite makes the loss NaN.
LossOutputs loss(const Tensor& features, const Tensor& partners, const Tensor& margins, const Tensor& pair_counts,
                 Form form, double apc_margin, int64_t bins, Reduction reduction, bool validate, bool finite);

std::tuple<Tensor, Tensor> loss_backward(const Tensor& grad, const Tensor& loss, const Tensor& features,
                                         const Tensor& partners, const Tensor& distances, const Tensor& margins,
                                         const Tensor& pair_counts, const Tensor& sums, const Tensor& histograms,
                                         Form form, double apc_margin, int64_t bins, Reduction reduction,
                                         bool margins_grad);

// A rank's partial vector [S + 4A + 3] float64 (common/shard_loss.h: partial_entry) from its sums,
// pair counts [A, 4], overflow flag (0-dim bool) and checks [2] bool.
Tensor partial_vector(const Tensor& sums, const Tensor& pair_counts, const Tensor& overflow, const Tensor& checks,
                      const PartialLayout& layout);

// crl_ops.distributed's finishing step on the ranks' summed partial vector total [S + 4A + 3]
// (common/shard_loss.h): (loss, pair_counts [A, 4] int64, grad_scale: world_size, NaN where a
// flag is set), the loss and scale in dtype. With validate, a set flag raises the single process's
// ValueError (logits, then features, then the overflow). The backward: d loss / d total, float64.
std::tuple<Tensor, Tensor, Tensor> shard_loss(const Tensor& total, const PartialLayout& layout, Reduction reduction,
                                              at::ScalarType dtype, int64_t world_size, bool validate);
Tensor shard_loss_backward(const Tensor& grad, const Tensor& total, const PartialLayout& layout, Reduction reduction,
                           at::ScalarType dtype);

}  // namespace cpu
}  // namespace crl
