// CUDA entry points of the crl_ops ops: argument checks (shared with the CPU kernels), device
// guard, current stream, output allocation and dtype dispatch; the kernels live in
// crl_kernels.cu. No host synchronisation: scalars such as the triplet count stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/crl_math.h"
#include "common/op_checks.h"
#include "cuda/crl_kernels.h"

namespace crl {
namespace {

using at::Tensor;

cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

cuda::Strides strides_of(const Tensor& features) {
  return {features.stride(0), features.stride(1), features.stride(2)};
}

// Outputs of the mining ops, anchors[B, A] and partners[B, A, 2K]; the kernels write every entry.
std::tuple<Tensor, Tensor> uninitialised_mined(const Tensor& labels, int64_t k) {
  return {at::empty({labels.size(0), labels.size(1)}, labels.options().dtype(at::kBool)),
          at::empty({labels.size(0), labels.size(1), 2 * k}, labels.options())};
}

std::tuple<Tensor, Tensor, Tensor> profile_cuda(const Tensor& labels_in, int64_t max_classes) {
  check_profile_args(labels_in, max_classes);
  c10::cuda::CUDAGuard guard(labels_in.device());
  const Tensor labels = labels_in.contiguous();
  const int64_t attributes = labels.size(1);
  // The kernels write every entry of their outputs: no separate fill launches.
  Tensor counts = at::empty({attributes, max_classes}, labels.options());
  Tensor minority = at::empty({attributes, max_classes}, labels.options().dtype(at::kBool));
  Tensor active = at::empty_like(minority);
  if (attributes > 0) {
    cuda::profile(labels.data_ptr<int64_t>(), labels.size(0), attributes, max_classes, counts.data_ptr<int64_t>(),
                  minority.data_ptr<bool>(), active.data_ptr<bool>(), current_stream());
  }
  return {counts, minority, active};
}

std::tuple<Tensor, Tensor> mine_class_cuda(const Tensor& scores_in, const Tensor& labels_in, const Tensor& active_in,
                                           int64_t k) {
  check_mine_class_args(scores_in, labels_in, active_in, k);
  c10::cuda::CUDAGuard guard(labels_in.device());
  const Tensor scores = scores_in.contiguous(), labels = labels_in.contiguous(), active = active_in.contiguous();
  const int64_t batch = labels.size(0), attributes = labels.size(1), max_classes = active.size(1);
  auto [anchors, partners] = uninitialised_mined(labels, k);
  if (batch * attributes == 0) return {anchors, partners};
  const auto int32 = labels.options().dtype(at::kInt);
  Tensor hard_pos = at::empty({attributes, max_classes, k}, int32);
  Tensor hard_neg = at::empty({attributes, max_classes, k}, int32);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "crl_ops::mine_class", [&] {
    Tensor keys = at::empty({k > 32 ? 2 * attributes * max_classes * k : 0}, scores.options());
    cuda::mine_class<scalar_t>(scores.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), active.data_ptr<bool>(), batch,
                               attributes, max_classes, k, hard_pos.data_ptr<int32_t>(), hard_neg.data_ptr<int32_t>(),
                               keys.data_ptr<scalar_t>(), anchors.data_ptr<bool>(), partners.data_ptr<int64_t>(),
                               current_stream());
  });
  return {anchors, partners};
}

std::tuple<Tensor, Tensor> mine_instance_cuda(const Tensor& features, const Tensor& predictions_in,
                                              const Tensor& labels_in, const Tensor& active_in, int64_t k) {
  check_mine_instance_args(features, predictions_in, labels_in, active_in, k);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor labels = labels_in.contiguous(), active = active_in.contiguous();
  const Tensor predictions = predictions_in.contiguous();
  const int64_t batch = labels.size(0), attributes = labels.size(1), dim = features.size(2);
  auto [anchors, partners] = uninitialised_mined(labels, k);
  if (batch * attributes == 0) return {anchors, partners};
  // [A, D, B]: a tile of candidates for one dimension is one coalesced read.
  const Tensor columns = features.to(accumulation_type(features.scalar_type())).permute({1, 2, 0}).contiguous();
  const auto int32 = labels.options().dtype(at::kInt);
  Tensor anchor_list = at::empty({attributes, batch}, int32);
  Tensor anchor_count = at::empty({attributes}, int32);
  const int64_t scratch = k > 32 ? 2 * batch * attributes * k : 0;
  Tensor index_scratch = at::empty({scratch}, int32);
  AT_DISPATCH_FLOATING_TYPES(columns.scalar_type(), "crl_ops::mine_instance", [&] {
    Tensor key_scratch = at::empty({scratch}, columns.options());
    cuda::mine_instance<scalar_t>(columns.data_ptr<scalar_t>(), predictions.data_ptr<int64_t>(),
                                  labels.data_ptr<int64_t>(), active.data_ptr<bool>(), batch, attributes, dim,
                                  active.size(1), k, anchor_list.data_ptr<int32_t>(), anchor_count.data_ptr<int32_t>(),
                                  key_scratch.data_ptr<scalar_t>(), index_scratch.data_ptr<int32_t>(),
                                  anchors.data_ptr<bool>(), partners.data_ptr<int64_t>(), current_stream());
  });
  return {anchors, partners};
}

// d[B, A, 2K] in the accumulation type; 0 where the partner slot is empty. partners: contiguous.
Tensor distances_cuda(const Tensor& features, const Tensor& partners) {
  Tensor distances = at::empty(partners.sizes(), features.options().dtype(accumulation_type(features.scalar_type())));
  if (partners.numel() == 0) return distances;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::distances", [&] {
    using acc = acc_t<scalar_t>;
    cuda::pair_distances<scalar_t, acc>(features.data_ptr<scalar_t>(), strides_of(features),
                                        partners.data_ptr<int64_t>(), features.size(0), features.size(1),
                                        features.size(2), partners.size(2), distances.data_ptr<acc>(),
                                        current_stream());
  });
  return distances;
}

// d loss / d features from grad[B, A, 2K] = d loss / d distances. All of partners, distances,
// grad: contiguous.
Tensor features_gradient_cuda(const Tensor& grad, const Tensor& features, const Tensor& partners,
                              const Tensor& distances) {
  const int64_t batch = features.size(0), attributes = features.size(1), dim = features.size(2);
  const int64_t width = partners.size(2);
  Tensor grad_features = at::zeros(features.sizes(), features.options().dtype(distances.scalar_type()));
  if (grad_features.numel() == 0) return grad_features.to(features.scalar_type());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  Tensor incoming, offsets;
  if (deterministic) {
    // Without float atomics: group the pairs by the sample they end at (a stable sort keeps
    // each group in pair order), then every feature entry sums its own list in that order.
    const Tensor attribute = at::arange(attributes, partners.options()).view({1, attributes, 1});
    const Tensor valid = (partners >= 0).logical_and(partners < batch);
    const Tensor keys = at::where(valid, attribute * batch + partners, attributes * batch).flatten();
    const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    incoming = std::get<1>(sorted);
    offsets = at::searchsorted(std::get<0>(sorted), at::arange(attributes * batch + 1, partners.options()));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::features_gradient",
                                  [&] {
    using acc = acc_t<scalar_t>;
    if (deterministic) {
      cuda::pair_distances_backward_sorted<scalar_t, acc>(
          grad.data_ptr<acc>(), features.data_ptr<scalar_t>(), strides_of(features), partners.data_ptr<int64_t>(),
          distances.data_ptr<acc>(), incoming.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), batch, attributes,
          dim, width, grad_features.data_ptr<acc>(), current_stream());
    } else {
      cuda::pair_distances_backward_atomic<scalar_t, acc>(
          grad.data_ptr<acc>(), features.data_ptr<scalar_t>(), strides_of(features), partners.data_ptr<int64_t>(),
          distances.data_ptr<acc>(), batch, attributes, dim, width, grad_features.data_ptr<acc>(), current_stream());
    }
  });
  return grad_features.to(features.scalar_type());
}

// The loss forms: 0-dim outputs stay on the device.
std::tuple<Tensor, Tensor, Tensor> relative_loss_cuda(const Tensor& features, const Tensor& partners_in,
                                                      const Tensor& margins_in) {
  check_relative_args(features, partners_in, margins_in);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor partners = partners_in.contiguous();
  const Tensor distances = distances_cuda(features, partners);
  const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
  Tensor loss = at::empty({}, distances.options());
  Tensor triplets = at::empty({}, partners.options());
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::relative_loss", [&] {
    cuda::relative_loss<scalar_t>(distances.data_ptr<scalar_t>(), partners.data_ptr<int64_t>(),
                                  margins.data_ptr<scalar_t>(), distances.size(0) * distances.size(1),
                                  distances.size(1), distances.size(2), loss.data_ptr<scalar_t>(),
                                  triplets.data_ptr<int64_t>(), current_stream());
  });
  return {loss, distances, triplets};
}

Tensor relative_loss_backward_cuda(const Tensor& grad_in, const Tensor& features, const Tensor& partners_in,
                                   const Tensor& distances_in, const Tensor& margins_in, const Tensor& num_triplets) {
  check_loss_backward_args(grad_in, features, partners_in, distances_in);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor distances = distances_in.contiguous(), partners = partners_in.contiguous();
  const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
  const Tensor grad = grad_in.to(distances.scalar_type()).contiguous();
  Tensor grad_d = at::empty_like(distances);
  if (grad_d.numel() == 0) return features_gradient_cuda(grad_d, features, partners, distances);
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::relative_loss_backward", [&] {
    cuda::relative_loss_backward<scalar_t>(grad.data_ptr<scalar_t>(), distances.data_ptr<scalar_t>(),
                                           partners.data_ptr<int64_t>(), margins.data_ptr<scalar_t>(),
                                           num_triplets.contiguous().data_ptr<int64_t>(),
                                           distances.size(0) * distances.size(1), distances.size(1),
                                           distances.size(2), grad_d.data_ptr<scalar_t>(), current_stream());
  });
  return features_gradient_cuda(grad_d, features, partners, distances);
}

std::tuple<Tensor, Tensor, Tensor> absolute_loss_cuda(const Tensor& features, const Tensor& partners_in,
                                                      double margin) {
  check_loss_args(features, partners_in);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor partners = partners_in.contiguous();
  const Tensor distances = distances_cuda(features, partners);
  Tensor loss = at::empty({}, distances.options());
  Tensor pairs = at::empty({2}, partners.options());
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::absolute_loss", [&] {
    cuda::absolute_loss<scalar_t>(distances.data_ptr<scalar_t>(), partners.data_ptr<int64_t>(),
                                  static_cast<scalar_t>(margin), distances.size(0) * distances.size(1),
                                  distances.size(2), loss.data_ptr<scalar_t>(), pairs.data_ptr<int64_t>(),
                                  current_stream());
  });
  return {loss, distances, pairs};
}

Tensor absolute_loss_backward_cuda(const Tensor& grad_in, const Tensor& features, const Tensor& partners_in,
                                   const Tensor& distances_in, double margin, const Tensor& num_pairs) {
  check_loss_backward_args(grad_in, features, partners_in, distances_in);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor distances = distances_in.contiguous(), partners = partners_in.contiguous();
  const Tensor grad = grad_in.to(distances.scalar_type()).contiguous();
  Tensor grad_d = at::empty_like(distances);
  if (grad_d.numel() == 0) return features_gradient_cuda(grad_d, features, partners, distances);
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::absolute_loss_backward", [&] {
    cuda::absolute_loss_backward<scalar_t>(grad.data_ptr<scalar_t>(), distances.data_ptr<scalar_t>(),
                                           partners.data_ptr<int64_t>(), static_cast<scalar_t>(margin),
                                           num_pairs.contiguous().data_ptr<int64_t>(),
                                           distances.size(0) * distances.size(1), distances.size(2),
                                           grad_d.data_ptr<scalar_t>(), current_stream());
  });
  return features_gradient_cuda(grad_d, features, partners, distances);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> distribution_loss_cuda(const Tensor& features,
                                                                          const Tensor& partners_in, int64_t bins) {
  check_loss_args(features, partners_in);
  check_bins(bins);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor partners = partners_in.contiguous();
  const Tensor distances = distances_cuda(features, partners);
  const int64_t attributes = distances.size(1);
  Tensor histograms = at::empty({attributes, 2, bins}, distances.options());  // the kernels write every entry
  Tensor scale = at::empty({attributes}, distances.options());
  Tensor pair_counts = at::empty({attributes, 2}, partners.options());
  Tensor loss = at::empty({}, distances.options());
  if (attributes == 0) return {loss.zero_(), distances, histograms, scale, pair_counts};
  Tensor per_attribute = at::empty({attributes}, distances.options());
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::distribution_loss", [&] {
    cuda::distribution_loss<scalar_t>(distances.data_ptr<scalar_t>(), partners.data_ptr<int64_t>(), distances.size(0),
                                      attributes, distances.size(2), bins, loss.data_ptr<scalar_t>(),
                                      histograms.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                      pair_counts.data_ptr<int64_t>(), per_attribute.data_ptr<scalar_t>(),
                                      current_stream());
  });
  return {loss, distances, histograms, scale, pair_counts};
}

Tensor distribution_loss_backward_cuda(const Tensor& grad_in, const Tensor& features, const Tensor& partners_in,
                                       const Tensor& distances_in, int64_t bins, const Tensor& histograms_in,
                                       const Tensor& scale_in, const Tensor& pair_counts_in) {
  check_distribution_backward_args(grad_in, features, partners_in, distances_in, bins, histograms_in, scale_in,
                                   pair_counts_in);
  const int64_t attributes = distances_in.size(1);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor distances = distances_in.contiguous(), partners = partners_in.contiguous();
  const Tensor histograms = histograms_in.to(distances.scalar_type()).contiguous();
  const Tensor scale = scale_in.to(distances.scalar_type()).contiguous();
  const Tensor grad = grad_in.to(distances.scalar_type()).contiguous();
  Tensor grad_d = at::empty_like(distances);  // the kernel writes every entry
  if (grad_d.numel() == 0) return features_gradient_cuda(grad_d, features, partners, distances);
  Tensor gradients = at::empty_like(histograms);
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::distribution_loss_backward", [&] {
    cuda::distribution_loss_backward<scalar_t>(
        grad.data_ptr<scalar_t>(), distances.data_ptr<scalar_t>(), partners.data_ptr<int64_t>(), distances.size(0),
        attributes, distances.size(2), bins, histograms.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
        pair_counts_in.contiguous().data_ptr<int64_t>(), gradients.data_ptr<scalar_t>(), grad_d.data_ptr<scalar_t>(),
        current_stream());
  });
  return features_gradient_cuda(grad_d, features, partners, distances);
}

}  // namespace
}  // namespace crl

TORCH_LIBRARY_IMPL(crl_ops, CUDA, m) {
  m.impl("profile", &crl::profile_cuda);
  m.impl("mine_class", &crl::mine_class_cuda);
  m.impl("mine_instance", &crl::mine_instance_cuda);
  m.impl("relative_loss", &crl::relative_loss_cuda);
  m.impl("relative_loss_backward", &crl::relative_loss_backward_cuda);
  m.impl("absolute_loss", &crl::absolute_loss_cuda);
  m.impl("absolute_loss_backward", &crl::absolute_loss_backward_cuda);
  m.impl("distribution_loss", &crl::distribution_loss_cuda);
  m.impl("distribution_loss_backward", &crl::distribution_loss_backward_cuda);
}
