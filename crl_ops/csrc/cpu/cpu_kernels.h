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

}  // namespace cpu
}  // namespace crl
