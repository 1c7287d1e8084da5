// Autograd of crl_ops::crl_loss, pair_distances, pair_sums, shard_sums and shard_loss, in C++: one node per op whose
// backward is one op call, without the Python function calls a torch.library.register_autograd
// formula costs on every step. The other ops give no gradient (their outputs are indices and
// masks) and have no double backward.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

namespace crl {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kFeaturesInput = 0, kMarginsInput = 4, kInputs = 13;

class CrlLoss : public torch::autograd::Function<CrlLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& features, const Tensor& logits,
                               const Tensor& labels, const Tensor& num_classes, const Tensor& margins,
                               c10::string_view mode, c10::string_view form, int64_t k, double apc_margin,
                               int64_t bins, double threshold, c10::string_view reduction, bool validate) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::crl_loss", "")
                               .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                 Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&, c10::string_view,
                                                                 c10::string_view, int64_t, double, int64_t, double,
                                                                 c10::string_view, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, counts, minority, active, anchors, partners, pair_counts, distances, sums, histograms] =
        op.call(features, logits, labels, num_classes, margins, mode, form, k, apc_margin, bins, threshold,
                reduction, validate);
    ctx->saved_data["form"] = std::string(form);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["apc_margin"] = apc_margin;
    ctx->saved_data["bins"] = bins;
    ctx->save_for_backward({loss, features, partners, distances, margins, pair_counts, sums, histograms});
    ctx->mark_non_differentiable({counts, minority, active, anchors, partners, pair_counts, distances, sums,
                                  histograms});
    ctx->set_materialize_grads(false);  // the non-differentiable outputs take no zero-filled gradients
    return {loss, counts, minority, active, anchors, partners, pair_counts, distances, sums, histograms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kInputs);
    if (!grads[0].defined()) return result;  // the loss itself took no gradient
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::crl_loss_backward", "")
                               .typed<std::tuple<Tensor, Tensor>(
                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                                   double, int64_t, c10::string_view, bool)>();
    const auto saved = ctx->get_saved_variables();
    const std::string form = ctx->saved_data["form"].toStringRef();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    auto [grad_features, grad_margins] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], form,
                ctx->saved_data["apc_margin"].toDouble(), ctx->saved_data["bins"].toInt(), reduction,
                ctx->needs_input_grad(kMarginsInput));
    if (ctx->needs_input_grad(kFeaturesInput)) result[kFeaturesInput] = grad_features;
    if (ctx->needs_input_grad(kMarginsInput)) result[kMarginsInput] = grad_margins;
    return result;
  }
};

class PairDistances : public torch::autograd::Function<PairDistances> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& vectors, const Tensor& partners,
                               c10::SymInt first_anchor) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::pair_distances", "")
                               .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymInt)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [distances, overflow] = op.call(vectors, partners, first_anchor);
    ctx->saved_data["first_anchor"] = first_anchor;
    ctx->save_for_backward({vectors, partners, distances});
    ctx->mark_non_differentiable({overflow});
    ctx->set_materialize_grads(false);
    return {distances, overflow};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(3);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::pair_distances_backward", "")
                               .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::SymInt)>();
    const auto saved = ctx->get_saved_variables();
    result[0] = op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["first_anchor"].toSymInt());
    return result;
  }
};

constexpr int kDistancesInput = 0, kPairMarginsInput = 2;

// PairSums and ShardSums save the same inputs, and their backward ops take the same arguments.
void save_sums_inputs(AutogradContext* ctx, const Tensor& distances, const Tensor& partners, const Tensor& margins,
                      const c10::optional<Tensor>& longest, c10::string_view form, double apc_margin, int64_t bins) {
  ctx->saved_data["form"] = std::string(form);
  ctx->saved_data["apc_margin"] = apc_margin;
  ctx->saved_data["bins"] = bins;
  ctx->saved_data["has_longest"] = longest.has_value();
  ctx->save_for_backward({distances, partners, margins, longest.value_or(Tensor())});
}

using SumsBackward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const c10::optional<Tensor>&, c10::string_view, double, int64_t, bool);
using SumsBackwardOp = c10::TypedOperatorHandle<SumsBackward>;

SumsBackwardOp sums_backward_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<SumsBackward>();
}

// The gradients of an op's `inputs` inputs from its backward op: distances and margins at the given
// input indices.
variable_list sums_backward(const SumsBackwardOp& op, AutogradContext* ctx, const Tensor& grad, int inputs,
                            int distances_input, int margins_input) {
  const auto saved = ctx->get_saved_variables();
  const c10::optional<Tensor> longest =
      ctx->saved_data["has_longest"].toBool() ? c10::optional<Tensor>(saved[3]) : c10::nullopt;
  auto [grad_distances, grad_margins] =
      op.call(grad, saved[0], saved[1], saved[2], longest, ctx->saved_data["form"].toStringRef(),
              ctx->saved_data["apc_margin"].toDouble(), ctx->saved_data["bins"].toInt(),
              ctx->needs_input_grad(margins_input));
  variable_list result(inputs);
  if (ctx->needs_input_grad(distances_input)) result[distances_input] = grad_distances;
  if (ctx->needs_input_grad(margins_input)) result[margins_input] = grad_margins;
  return result;
}

class PairSums : public torch::autograd::Function<PairSums> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& distances, const Tensor& partners, const Tensor& margins,
                        const c10::optional<Tensor>& longest, c10::string_view form, double apc_margin, int64_t bins) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::pair_sums", "")
                               .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                             c10::string_view, double, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor sums = op.call(distances, partners, margins, longest, form, apc_margin, bins);
    save_sums_inputs(ctx, distances, partners, margins, longest, form, apc_margin, bins);
    return sums;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = sums_backward_op("crl_ops::pair_sums_backward");
    return sums_backward(op, ctx, grads[0], 7, kDistancesInput, kPairMarginsInput);
  }
};

constexpr int kShardSumsInputs = 10, kShardLossInputs = 8;

// crl_ops.distributed's sums of a rank's pairs: the gradient w.r.t. distances and margins.
class ShardSums : public torch::autograd::Function<ShardSums> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& distances, const Tensor& partners, const Tensor& anchors,
                        const Tensor& margins, const c10::optional<Tensor>& longest, const Tensor& overflow,
                        const Tensor& checks, c10::string_view form, double apc_margin, int64_t bins) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::shard_sums", "")
                               .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const c10::optional<Tensor>&, const Tensor&, const Tensor&,
                                             c10::string_view, double, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor partial = op.call(distances, partners, anchors, margins, longest, overflow, checks, form, apc_margin, bins);
    save_sums_inputs(ctx, distances, partners, margins, longest, form, apc_margin, bins);
    return partial;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = sums_backward_op("crl_ops::shard_sums_backward");
    return sums_backward(op, ctx, grads[0], kShardSumsInputs, 0, 3);
  }
};

// The global loss from the summed partial sums: the gradient w.r.t. them.
class ShardLoss : public torch::autograd::Function<ShardLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& total, int64_t num_attributes,
                               c10::string_view form, int64_t bins, c10::string_view reduction, at::ScalarType dtype,
                               int64_t world_size, bool validate) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::shard_loss", "")
                               .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, c10::string_view,
                                                                         int64_t, c10::string_view, at::ScalarType,
                                                                         int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, pair_counts, grad_scale] =
        op.call(total, num_attributes, form, bins, reduction, dtype, world_size, validate);
    ctx->saved_data["num_attributes"] = num_attributes;
    ctx->saved_data["form"] = std::string(form);
    ctx->saved_data["bins"] = bins;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["dtype"] = static_cast<int64_t>(dtype);
    ctx->save_for_backward({total});
    ctx->mark_non_differentiable({pair_counts, grad_scale});
    ctx->set_materialize_grads(false);
    return {loss, pair_counts, grad_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kShardLossInputs);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("crl_ops::shard_loss_backward", "")
                               .typed<Tensor(const Tensor&, const Tensor&, int64_t, c10::string_view, int64_t,
                                             c10::string_view, at::ScalarType)>();
    result[0] = op.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["num_attributes"].toInt(),
                        ctx->saved_data["form"].toStringRef(), ctx->saved_data["bins"].toInt(),
                        ctx->saved_data["reduction"].toStringRef(),
                        static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt()));
    return result;
  }
};

Tensor shard_sums_autograd(const Tensor& distances, const Tensor& partners, const Tensor& anchors, const Tensor& margins,
                           const c10::optional<Tensor>& longest, const Tensor& overflow, const Tensor& checks,
                           c10::string_view form, double apc_margin, int64_t bins) {
  return ShardSums::apply(distances, partners, anchors, margins, longest, overflow, checks, form, apc_margin, bins);
}

std::tuple<Tensor, Tensor, Tensor> shard_loss_autograd(const Tensor& total, int64_t num_attributes,
                                                       c10::string_view form, int64_t bins,
                                                       c10::string_view reduction, at::ScalarType dtype,
                                                       int64_t world_size, bool validate) {
  auto out = ShardLoss::apply(total, num_attributes, form, bins, reduction, dtype, world_size, validate);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> pair_distances_autograd(const Tensor& vectors, const Tensor& partners,
                                                   c10::SymInt first_anchor) {
  auto out = PairDistances::apply(vectors, partners, std::move(first_anchor));
  return {out[0], out[1]};
}

Tensor pair_sums_autograd(const Tensor& distances, const Tensor& partners, const Tensor& margins,
                          const c10::optional<Tensor>& longest, c10::string_view form, double apc_margin, int64_t bins) {
  return PairSums::apply(distances, partners, margins, longest, form, apc_margin, bins);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> crl_loss_autograd(
    const Tensor& features, const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
    const Tensor& margins, c10::string_view mode, c10::string_view form, int64_t k, double apc_margin, int64_t bins,
    double threshold, c10::string_view reduction, bool validate) {
  auto out = CrlLoss::apply(features, logits, labels, num_classes, margins, mode, form, k, apc_margin, bins,
                            threshold, reduction, validate);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9]};
}

}  // namespace
}  // namespace crl

TORCH_LIBRARY_IMPL(crl_ops, Autograd, m) {
  m.impl("crl_loss", &crl::crl_loss_autograd);
  m.impl("pair_distances", &crl::pair_distances_autograd);
  m.impl("pair_sums", &crl::pair_sums_autograd);
  m.impl("shard_sums", &crl::shard_sums_autograd);
  m.impl("shard_loss", &crl::shard_loss_autograd);
  // crl_ops.distributed's shard_table and table_distances take their gradient from its autograd function
  // (the table's all-reduce sits between them).
  for (const char* op : {"profile", "class_lists", "mine_class", "mine_instance", "shard_mine", "crl_loss_backward",
                         "pair_distances_backward", "pair_sums_backward", "shard_sums_backward",
                         "shard_loss_backward", "shard_table", "shard_table_backward", "table_distances",
                         "table_distances_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
