// The loss of the global batch from the ranks' summed partial sums (crl_ops.distributed), and its
// gradient: semantics section 3's reductions of per-attribute sums and counts, written with ATen
// operations so that one source serves every device. The vectors are a few hundred numbers: the
// cost is in the calls, not the arithmetic.
#pragma once

#include <ATen/ATen.h>

#include "common/op_checks.h"

namespace crl {

namespace shard_detail {

inline at::Tensor mean(const at::Tensor& total, const at::Tensor& count) { return total / count.clamp_min(1); }

// The per-attribute sums and counts of a form, as reference.PairSums: (first, second, first_count,
// second_count), counts in the loss dtype.
struct Sums {
  at::Tensor first, second, first_count, second_count;
};

// 0-dim bool: whether any rank set a flag.
inline at::Tensor flags_set(const at::Tensor& total, const PartialLayout& layout) {
  return total.narrow(0, layout.flags(), 3).gt(0).any();
}

}  // namespace shard_detail

// The pair_sums part of the partial vector `total` (or of a gradient of it), in `dtype`.
inline at::Tensor sums_of(const at::Tensor& total, const PartialLayout& layout, at::ScalarType dtype) {
  return total.narrow(0, 0, layout.sums()).view(layout.sums_shape()).to(dtype);
}

// The pair counts [A, 4] of the partial vector `total`, in `dtype`.
inline at::Tensor counts_of(const at::Tensor& total, const PartialLayout& layout, at::ScalarType dtype) {
  return total.narrow(0, layout.counts(), 4 * layout.attributes).view({layout.attributes, 4}).to(dtype);
}

// (loss, flags set: a 0-dim bool) of the summed partial vector `total`, in `dtype`.
inline std::tuple<at::Tensor, at::Tensor> loss_of_total(const at::Tensor& total, const PartialLayout& layout,
                                                        Reduction reduction, at::ScalarType dtype) {
  using namespace shard_detail;
  const at::Tensor sums = sums_of(total, layout, dtype), counts = counts_of(total, layout, dtype);
  const at::Tensor failed = flags_set(total, layout);
  at::Tensor loss;
  if (layout.form == Form::Distribution) {  // Eq. 12-14, the mean over attributes with both pair kinds
    const at::Tensor positives = counts.select(1, 1), negatives = counts.select(1, 2);
    const at::Tensor h_pos = sums.select(1, 0) / positives.clamp_min(1).unsqueeze(1);
    const at::Tensor h_neg = sums.select(1, 1) / negatives.clamp_min(1).unsqueeze(1);
    const at::Tensor counted = positives.gt(0).logical_and(negatives.gt(0));
    const at::Tensor overlap = at::where(counted, (h_pos * h_neg.cumsum(-1)).sum(-1), 0.0);
    loss = mean(overlap.sum(), counted.sum().to(dtype));
  } else {
    const bool relative = layout.form == Form::Relative;
    const at::Tensor first = sums.select(1, 0), second = sums.select(1, 1);
    const at::Tensor first_count = counts.select(1, relative ? 3 : 1), second_count = counts.select(1, 2);
    if (reduction == Reduction::Attribute) {
      at::Tensor per_attribute, has_terms;
      if (relative) {
        per_attribute = mean(first, first_count);
        has_terms = first_count.gt(0);
      } else {
        per_attribute = 0.5 * (mean(first, first_count) + mean(second, second_count));
        has_terms = first_count.gt(0).logical_or(second_count.gt(0));
      }
      loss = mean(at::where(has_terms, per_attribute, 0.0).sum(), has_terms.sum().to(dtype));
    } else if (relative) {
      loss = mean(first.sum(), first_count.sum());
    } else {
      loss = 0.5 * (mean(first.sum(), first_count.sum()) + mean(second.sum(), second_count.sum()));
    }
  }
  return {at::where(failed, std::numeric_limits<double>::quiet_NaN(), loss), failed};
}

// d loss / d total [size] float64 for the incoming 0-dim grad: non-zero on the sums only; NaN
// everywhere where a flag is set (section 6: every entry of the gradient NaN).
inline at::Tensor loss_of_total_backward(const at::Tensor& grad, const at::Tensor& total, const PartialLayout& layout,
                                         Reduction reduction, at::ScalarType dtype) {
  using namespace shard_detail;
  const at::Tensor sums = sums_of(total, layout, dtype), counts = counts_of(total, layout, dtype);
  const at::Tensor g = grad.to(dtype);
  at::Tensor first, second;  // d loss / d (the two columns of the sums)
  if (layout.form == Form::Distribution) {
    const at::Tensor positives = counts.select(1, 1).clamp_min(1).unsqueeze(1);
    const at::Tensor negatives = counts.select(1, 2).clamp_min(1).unsqueeze(1);
    const at::Tensor counted = counts.select(1, 1).gt(0).logical_and(counts.select(1, 2).gt(0));
    const at::Tensor h_pos = sums.select(1, 0) / positives, h_neg = sums.select(1, 1) / negatives;
    // overlap = sum_t h_pos[t] cumsum(h_neg)[t]: d/d h_neg[u] = sum over t >= u of h_pos[t].
    const at::Tensor tail_pos = h_pos.flip(-1).cumsum(-1).flip(-1);
    const at::Tensor scale = at::where(counted, g / counted.sum().to(dtype).clamp_min(1), 0.0).unsqueeze(1);
    first = scale * h_neg.cumsum(-1) / positives;
    second = scale * tail_pos / negatives;
  } else {
    const bool relative = layout.form == Form::Relative;
    const at::Tensor first_count = counts.select(1, relative ? 3 : 1), second_count = counts.select(1, 2);
    const double half = relative ? 1.0 : 0.5;
    if (reduction == Reduction::Attribute) {
      const at::Tensor has_terms =
          relative ? first_count.gt(0) : first_count.gt(0).logical_or(second_count.gt(0));
      const at::Tensor per_attribute = at::where(has_terms, half * g / has_terms.sum().to(dtype).clamp_min(1), 0.0);
      first = per_attribute / first_count.clamp_min(1);
      second = relative ? at::zeros_like(first) : per_attribute / second_count.clamp_min(1);
    } else {
      const auto pooled = [&](const at::Tensor& count) {
        return (half * g / count.sum().clamp_min(1)).expand({layout.attributes});
      };
      first = pooled(first_count);
      second = relative ? at::zeros_like(first) : pooled(second_count);
    }
  }
  at::Tensor result = at::zeros({layout.size()}, total.options());
  result.narrow(0, 0, layout.sums()).view(layout.sums_shape()).copy_(at::stack({first, second}, 1));
  return at::where(flags_set(total, layout), std::numeric_limits<double>::quiet_NaN(), result);
}

}  // namespace crl
