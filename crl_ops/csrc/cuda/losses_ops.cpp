// CUDA loss stages at the level of tensors (cuda/stages.h): outputs and scratch, dtype dispatch
// and the launchers of losses.cu. As cpu/losses.cpp, but without a host synchronisation: the
// loss, its NaN rule and the backward's NaN check stay on the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/op_checks.h"
#include "cuda/kernels.h"
#include "cuda/stages.h"
#include "cuda/tensor_glue.h"

namespace crl {
namespace cuda {

Tensor pair_counts(const Tensor& anchors, const Tensor& partners) {
  const int64_t batch = partners.size(0), attributes = partners.size(1);
  Tensor counts = at::empty({attributes, 4}, partners.options());
  if (attributes == 0) return counts;
  const Tensor scratch = workspace(partners, pair_counts_workspace(batch, attributes));
  cuda::pair_counts(anchors.data_ptr<bool>(), partners.data_ptr<int64_t>(), batch, attributes, partners.size(2),
                    counts.data_ptr<int64_t>(), scratch.data_ptr(), current_stream());
  return counts;
}

LossOutputs loss(const Tensor& features, const Tensor& partners, const Tensor& margins_in, const Tensor& pair_counts,
                 Form form, double apc_margin, int64_t bins, Reduction reduction, bool validate,
                 const Tensor& finite) {
  const int64_t batch = partners.size(0), attributes = partners.size(1), width = partners.size(2);
  const auto acc_type = accumulation_type(features.scalar_type());
  const auto options = features.options().dtype(acc_type);
  // Every entry is written by the kernels: no fills.
  Tensor distances = at::empty(partners.sizes(), options);
  Tensor sums = at::empty({attributes, 2}, options);
  Tensor histograms = at::empty({attributes, 2, form == Form::Distribution ? bins : 0}, options);
  Tensor loss = at::empty({}, options);
  const Tensor margins = form == Form::Relative ? as_type(margins_in, acc_type) : margins_in;
  const RowTiles tiles = row_tiles(batch, attributes, width);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::loss", [&] {
    using acc = acc_t<scalar_t>;
    const Tensor scratch = workspace(features, loss_workspace<acc>(form, tiles, bins));
    const LossArgs<scalar_t, acc> args{features_of<scalar_t>(features),
                                       partners.data_ptr<int64_t>(),
                                       tiles,
                                       form,
                                       reduction,
                                       validate,
                                       form == Form::Relative ? margins.data_ptr<acc>() : nullptr,
                                       form == Form::Relative ? margins.stride(0) : 0,
                                       static_cast<acc>(apc_margin),
                                       bins,
                                       pair_counts.data_ptr<int64_t>(),
                                       finite.data_ptr<bool>(),
                                       distances.data_ptr<acc>(),
                                       sums.data_ptr<acc>(),
                                       form == Form::Distribution ? histograms.data_ptr<acc>() : nullptr,
                                       loss.data_ptr<acc>()};
    cuda::loss(args, scratch.data_ptr(), current_stream());
  });
  return {loss, distances, sums, histograms};
}

std::tuple<Tensor, Tensor> loss_backward(const Tensor& grad_in, const Tensor& loss_in, const Tensor& features,
                                         const Tensor& partners, const Tensor& distances, const Tensor& margins_in,
                                         const Tensor& pair_counts, const Tensor& sums, const Tensor& histograms,
                                         Form form, double apc_margin, int64_t bins, Reduction reduction,
                                         bool margins_grad) {
  const int64_t batch = partners.size(0), attributes = partners.size(1), width = partners.size(2);
  const int64_t dim = features.size(2);
  const auto acc_type = distances.scalar_type();
  const Tensor grad = as_type(grad_in, acc_type), loss = as_type(loss_in, acc_type);
  const Tensor margins = form == Form::Relative ? as_type(margins_in, acc_type) : margins_in;
  const RowTiles tiles = row_tiles(batch, attributes, width);
  Tensor grad_margins = at::empty({margins_grad ? attributes : 0}, distances.options());
  Tensor grad_features;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::loss_backward", [&] {
    using acc = acc_t<scalar_t>;
    const Tensor scratch = workspace(features, backward_workspace<acc>(tiles));
    const BackwardArgs<scalar_t, acc> args{features_of<scalar_t>(features),
                                           partners.data_ptr<int64_t>(),
                                           distances.data_ptr<acc>(),
                                           tiles,
                                           form,
                                           reduction,
                                           grad.data_ptr<acc>(),
                                           loss.data_ptr<acc>(),
                                           form == Form::Relative ? margins.data_ptr<acc>() : nullptr,
                                           form == Form::Relative ? margins.stride(0) : 0,
                                           static_cast<acc>(apc_margin),
                                           bins,
                                           pair_counts.data_ptr<int64_t>(),
                                           sums.data_ptr<acc>(),
                                           form == Form::Distribution ? histograms.data_ptr<acc>() : nullptr,
                                           margins_grad ? grad_margins.data_ptr<acc>() : nullptr};
    if (!at::globalContext().deterministicAlgorithms()) {
      Tensor gradient = at::empty({batch, attributes, dim}, distances.options());
      loss_backward_atomic(args, gradient.data_ptr<acc>(), scratch.data_ptr(), current_stream());
      grad_features = as_type(gradient, features.scalar_type());
      return;
    }
    // Without float atomics: the pairs grouped by the sample they end at (a stable sort keeps
    // each group in pair order), then every entry sums its own row's pairs and its group in order.
    Tensor scales = at::empty(partners.sizes(), distances.options());
    loss_backward_scales(args, scales.data_ptr<acc>(), scratch.data_ptr(), current_stream());
    const Tensor attribute = at::arange(attributes, partners.options()).view({1, attributes, 1});
    const Tensor keys = at::where(partners >= 0, attribute * batch + partners, attributes * batch).flatten();
    const auto [sorted, incoming] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const Tensor offsets = at::searchsorted(sorted, at::arange(attributes * batch + 1, partners.options()));
    grad_features = at::empty({batch, attributes, dim}, features.options());
    loss_backward_gather(args, scales.data_ptr<acc>(), incoming.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                         grad_features.data_ptr<scalar_t>(), current_stream());
  });
  return {grad_features, as_type(grad_margins, margins_in.scalar_type())};
}

Tensor partial_vector(const Tensor& sums, const Tensor& pair_counts, const Tensor& overflow, const Tensor& checks,
                      const PartialLayout& layout) {
  Tensor partial = at::empty({layout.size()}, sums.options().dtype(at::kDouble));
  const Tensor flags = checks.contiguous();
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "crl_ops::partial_vector", [&] {
    cuda::partial_vector(sums.data_ptr<scalar_t>(), pair_counts.data_ptr<int64_t>(), overflow.data_ptr<bool>(),
                         flags.data_ptr<bool>(), layout, partial.data_ptr<double>(), current_stream());
  });
  return partial;
}

std::tuple<Tensor, Tensor, Tensor> shard_loss(const Tensor& total_in, const PartialLayout& layout, Reduction reduction,
                                              at::ScalarType dtype, int64_t world_size, bool validate) {
  const Tensor total = total_in.contiguous();
  Tensor pair_counts = at::empty({layout.attributes, 4}, total.options().dtype(at::kLong));
  Tensor loss = at::empty({}, total.options().dtype(dtype));
  Tensor grad_scale = at::empty({}, total.options().dtype(dtype));
  const Tensor scratch = workspace(total, shard_loss_workspace(layout.attributes, at::elementSize(dtype)));
  AT_DISPATCH_FLOATING_TYPES(dtype, "crl_ops::shard_loss", [&] {
    cuda::shard_loss(total.data_ptr<double>(), layout, reduction, world_size, validate, pair_counts.data_ptr<int64_t>(),
                     loss.data_ptr<scalar_t>(), grad_scale.data_ptr<scalar_t>(), scratch.data_ptr(), current_stream());
  });
  return {loss, pair_counts, grad_scale};
}

Tensor shard_loss_backward(const Tensor& grad_in, const Tensor& total_in, const PartialLayout& layout,
                           Reduction reduction, at::ScalarType dtype) {
  const Tensor total = total_in.contiguous(), grad = as_type(grad_in, dtype);
  Tensor grad_total = at::empty({layout.size()}, total.options());
  const Tensor scratch = workspace(total, shard_loss_workspace(layout.attributes, at::elementSize(dtype)));
  AT_DISPATCH_FLOATING_TYPES(dtype, "crl_ops::shard_loss_backward", [&] {
    cuda::shard_loss_backward(grad.data_ptr<scalar_t>(), total.data_ptr<double>(), layout, reduction,
                              grad_total.data_ptr<double>(), scratch.data_ptr(), current_stream());
  });
  return grad_total;
}

}  // namespace cuda
}  // namespace crl
