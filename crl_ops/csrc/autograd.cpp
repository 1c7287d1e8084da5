// Autograd of crl_ops::crl_loss, in C++: one node per step whose backward is one op call, without
// the Python function calls a torch.library.register_autograd formula costs on every step. The
// other ops give no gradient (their outputs are indices and masks) and have no double backward.
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
  for (const char* op : {"profile", "mine_class", "mine_instance", "crl_loss_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
