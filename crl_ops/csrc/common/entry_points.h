// The op entry points, written once for every device: argument checks, the device guard, and the
// order of the stages (docs/semantics.md). A device supplies the kernels as static members of a
// `Device` struct (cpu/cpu_ops.cpp, cuda/cuda_ops.cpp):
//
//   Guard(const Tensor&)                       makes the tensor's device current
//   Flag                                       bool on the CPU; a 0-dim bool tensor on a GPU (no sync)
//   profile(labels, num_classes, max_classes, threshold, validate) -> (counts, minority, active)
//   check_finite(features or undefined, logits, num_classes, validate) -> Flag
//   nonfinite_checks(features or undefined, logits, num_classes) -> [2] bool (logits, either not finite)
//   class_lists(logits, labels, num_classes, active or undefined, k) -> (keys, indices)
//   mine_class(logits, labels, num_classes, active, k, first, rows) -> (anchors, partners)
//   partner_rows(lists, labels, num_classes, active, first, rows) -> (anchors, partners of [own rows; table])
//   shard_table(vectors, lists, first) -> this rank's share of class mode's partner table
//   shard_table_backward(grad_table, grad_rows, lists, first, grad_scale) -> grad of this rank's rows
//   mine_instance(features, logits, labels, num_classes, active, k, first, rows) -> (anchors, partners, Flag overflow)
//   check_overflow(Flag overflow, dtype)       the error (or assertion) of an overflowing distance
//   pair_counts(anchors, partners) -> [A, 4]
//   pair_distances(vectors, partners, first) -> (distances, Flag overflow)
//   pair_distances_backward(grad, vectors, partners, distances, first) -> grad_vectors
//   pair_sums(distances, partners, margins, longest or undefined, form, apc_margin, bins) -> sums
//   pair_sums_backward(grad, distances, partners, margins, longest or undefined, form, apc_margin, bins,
//                      margins_grad) -> (grad_distances, grad_margins)
//   as_tensor(Flag, like) -> a 0-dim bool tensor on like's device
//   loss(features, partners, margins, pair_counts, form, apc_margin, bins, reduction, validate, Flag finite)
//       -> {loss, distances, sums, histograms}
//   loss_backward(grad, loss, features, partners, distances, margins, pair_counts, sums, histograms, form,
//                 apc_margin, bins, reduction, margins_grad) -> (grad_features, grad_margins)
//   partial_vector(sums, pair_counts, overflow, checks, layout) -> a rank's partial vector (float64)
//   shard_loss(total, layout, reduction, dtype, world_size, validate) -> (loss, pair_counts, grad_scale)
//   shard_loss_backward(grad, total, layout, reduction, dtype) -> grad_total
//
// with labels, num_classes and active contiguous; features and logits in any layout.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/op_checks.h"
#include "common/partner_rows.h"

namespace crl {

template <typename Device>
struct EntryPoints {
  using Tensor = at::Tensor;

  static std::tuple<Tensor, Tensor, Tensor> profile(const Tensor& labels, const Tensor& num_classes,
                                                    int64_t max_classes, double threshold, bool validate) {
    check_profile_args(labels, num_classes, max_classes, threshold);
    typename Device::Guard guard(labels);
    return Device::profile(labels.contiguous(), num_classes.contiguous(), max_classes, threshold, validate);
  }

  static std::tuple<Tensor, Tensor> class_lists(const Tensor& logits, const Tensor& labels,
                                                const Tensor& num_classes, const c10::optional<Tensor>& active,
                                                int64_t k, bool validate) {
    check_labels(labels, num_classes);
    check_logits(logits, labels);
    if (active.has_value()) check_active(*active, labels, max_classes_of(logits));
    check_k(k);
    typename Device::Guard guard(labels);
    const Tensor classes = num_classes.contiguous();
    Device::check_finite(Tensor(), logits, classes, validate);
    return Device::class_lists(logits, labels.contiguous(), classes,
                               active.has_value() ? active->contiguous() : Tensor(), k);
  }

  static std::tuple<Tensor, Tensor> mine_class(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                               const Tensor& active, int64_t k, int64_t first_anchor,
                                               int64_t num_anchors, bool validate) {
    check_mine_args(nullptr, logits, labels, num_classes, active, k, first_anchor, num_anchors);
    typename Device::Guard guard(labels);
    const Tensor classes = num_classes.contiguous();
    Device::check_finite(Tensor(), logits, classes, validate);
    return Device::mine_class(logits, labels.contiguous(), classes, active.contiguous(), k, first_anchor,
                              num_anchors);
  }

  static std::tuple<Tensor, Tensor> mine_instance(const Tensor& features, const Tensor& logits,
                                                  const Tensor& labels, const Tensor& num_classes,
                                                  const Tensor& active, int64_t k, int64_t first_anchor,
                                                  int64_t num_anchors, bool validate) {
    check_mine_args(&features, logits, labels, num_classes, active, k, first_anchor, num_anchors);
    typename Device::Guard guard(labels);
    const Tensor classes = num_classes.contiguous();
    Device::check_finite(features, logits, classes, validate);
    auto [anchors, partners, overflow] = Device::mine_instance(features, logits, labels.contiguous(), classes,
                                                               active.contiguous(), k, first_anchor, num_anchors);
    if (validate) Device::check_overflow(overflow, accumulation_type(features.scalar_type()));
    return {anchors, partners};
  }

  static std::tuple<Tensor, Tensor> pair_distances(const Tensor& vectors, const Tensor& partners,
                                                   int64_t first_anchor) {
    check_pair_distances_args(vectors, partners, first_anchor);
    typename Device::Guard guard(vectors);
    auto [distances, overflow] = Device::pair_distances(vectors, partners.contiguous(), first_anchor);
    return {distances, Device::as_tensor(overflow, vectors)};
  }

  static Tensor pair_distances_backward(const Tensor& grad, const Tensor& vectors, const Tensor& partners,
                                        const Tensor& distances, int64_t first_anchor) {
    check_pair_distances_backward_args(grad, vectors, partners, distances, first_anchor);
    typename Device::Guard guard(vectors);
    return Device::pair_distances_backward(grad.contiguous(), vectors, partners.contiguous(), distances.contiguous(),
                                           first_anchor);
  }

  static Tensor pair_sums(const Tensor& distances, const Tensor& partners, const Tensor& margins,
                          const c10::optional<Tensor>& longest, c10::string_view form, double apc_margin,
                          int64_t bins) {
    const Form loss_form = parse_form(form);
    check_pair_sums_args(distances, partners, margins, longest, loss_form, apc_margin, bins);
    typename Device::Guard guard(distances);
    return Device::pair_sums(distances.contiguous(), partners.contiguous(), margins, longest.value_or(Tensor()),
                             loss_form, apc_margin, bins);
  }

  static std::tuple<Tensor, Tensor> pair_sums_backward(const Tensor& grad, const Tensor& distances,
                                                       const Tensor& partners, const Tensor& margins,
                                                       const c10::optional<Tensor>& longest, c10::string_view form,
                                                       double apc_margin, int64_t bins, bool margins_grad) {
    const Form loss_form = parse_form(form);
    check_pair_sums_backward_args(grad, distances, partners, margins, longest, loss_form, apc_margin, bins);
    typename Device::Guard guard(distances);
    return Device::pair_sums_backward(grad, distances.contiguous(), partners.contiguous(), margins,
                                      longest.value_or(Tensor()), loss_form, apc_margin, bins, margins_grad);
  }

  // ---- crl_ops.distributed's steps (op_schemas.h) ----

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> shard_mine(
      const c10::optional<Tensor>& vectors, const Tensor& logits, const Tensor& labels_in, const Tensor& num_classes_in,
      c10::string_view mode, int64_t k, double threshold, int64_t first_anchor, int64_t num_anchors,
      bool partner_rows, bool validate) {
    const Mode mining = parse_mode(mode);
    check_labels(labels_in, num_classes_in);
    check_logits(logits, labels_in);
    check_k(k);
    check_threshold(threshold);
    check_anchor_rows(first_anchor, num_anchors, labels_in.size(0));
    TORCH_CHECK_VALUE(vectors.has_value() || mining == Mode::Class, "crl_ops: instance mining needs vectors");
    TORCH_CHECK_VALUE(!partner_rows || mining == Mode::Class, "crl_ops: partner_rows is for class mining");
    if (vectors.has_value()) {  // the gathered batch's, or (class mode) this rank's own rows
      check_features(*vectors, mining == Mode::Class ? labels_in.narrow(0, first_anchor, num_anchors) : labels_in);
      check_same_device(*vectors, "vectors", labels_in, "labels");
    }
    typename Device::Guard guard(labels_in);
    const Tensor labels = labels_in.contiguous(), num_classes = num_classes_in.contiguous();
    // Every rank holds the same gathered labels: a bad one raises on every rank alike.
    auto [counts, minority, active] = Device::profile(labels, num_classes, max_classes_of(logits), threshold, validate);
    // The values of this rank's rows only: their flags are summed over the ranks (shard_loss raises).
    const Tensor own_vectors = !vectors.has_value()       ? Tensor()
                               : mining == Mode::Class ? *vectors
                                                       : vectors->narrow(0, first_anchor, num_anchors);
    const Tensor checks =
        Device::nonfinite_checks(own_vectors, logits.narrow(0, first_anchor, num_anchors), num_classes);
    Tensor anchors, partners, lists = at::empty({0}, labels.options());
    if (partner_rows) {
      std::tie(std::ignore, lists) = Device::class_lists(logits, labels, num_classes, active, k);
      std::tie(anchors, partners) = Device::partner_rows(lists, labels, num_classes, active, first_anchor, num_anchors);
    } else if (mining == Mode::Class) {
      std::tie(anchors, partners) =
          Device::mine_class(logits, labels, num_classes, active, k, first_anchor, num_anchors);
    } else {  // the overflow of a mined pair is pair_distances' flag
      std::tie(anchors, partners, std::ignore) =
          Device::mine_instance(*vectors, logits, labels, num_classes, active, k, first_anchor, num_anchors);
    }
    return {counts, minority, active, anchors, partners, checks, lists};
  }

  static Tensor shard_table(const Tensor& vectors, const Tensor& lists, int64_t first_anchor) {
    check_table_args(vectors, lists, first_anchor);
    typename Device::Guard guard(vectors);
    return Device::shard_table(vectors, lists.contiguous(), first_anchor);
  }

  static Tensor shard_table_backward(const Tensor& grad_table, const Tensor& grad_rows, const Tensor& lists,
                                     int64_t first_anchor, const Tensor& grad_scale) {
    check_table_args(grad_rows, lists, first_anchor);
    TORCH_CHECK_VALUE(grad_table.dim() == 3 && grad_table.size(0) == lists.size(1) * lists.size(2) &&
                          grad_table.size(1) == lists.size(0) && grad_table.size(2) == grad_rows.size(2),
                      "crl_ops: grad_table must have shape [Cmax 2K, A, D] = [", lists.size(1) * lists.size(2), ", ",
                      lists.size(0), ", ", grad_rows.size(2), "], got ", grad_table.sizes());
    TORCH_CHECK_VALUE(grad_scale.dim() == 0 && grad_scale.is_floating_point(),
                      "crl_ops: grad_scale must be a floating 0-dim tensor, got ", grad_scale.sizes());
    check_same_device(grad_table, "grad_table", grad_rows, "grad_rows");
    check_same_device(grad_scale, "grad_scale", grad_rows, "grad_rows");
    typename Device::Guard guard(grad_rows);
    return Device::shard_table_backward(grad_table, grad_rows, lists.contiguous(), first_anchor, grad_scale);
  }

  static std::tuple<Tensor, Tensor, Tensor> table_distances(const Tensor& vectors, const Tensor& table,
                                                            const Tensor& partners) {
    check_table_distances_args(vectors, table, partners);
    typename Device::Guard guard(vectors);
    auto [distances, overflow] =
        Device::pair_distances(partner_rows::joined_vectors(vectors, table), partners.contiguous(), 0);
    const Tensor longest = partners.size(0) == 0 ? at::zeros({partners.size(1)}, distances.options())
                                                 : distances.amax({0, 2});  // 0 where empty
    return {distances, Device::as_tensor(overflow, vectors), longest};
  }

  static std::tuple<Tensor, Tensor> table_distances_backward(const Tensor& grad, const Tensor& vectors,
                                                             const Tensor& table, const Tensor& partners,
                                                             const Tensor& distances) {
    check_table_distances_args(vectors, table, partners);
    check_pair_values(distances, "distances", partners, vectors.scalar_type());
    check_pair_values(grad, "grad", partners, vectors.scalar_type());
    typename Device::Guard guard(vectors);
    const Tensor joined = partner_rows::joined_vectors(vectors, table);
    const Tensor grad_joined = Device::pair_distances_backward(grad.contiguous(), joined, partners.contiguous(),
                                                               distances.contiguous(), 0);
    const int64_t rows = vectors.size(0);
    Tensor grad_vectors = grad_joined.narrow(0, 0, rows);
    if (vectors.size(1) == 1 && table.size(1) > 1) grad_vectors = grad_vectors.sum(1, /*keepdim=*/true);
    // A copy: two outputs of an op may not share memory.
    return {grad_vectors, grad_joined.narrow(0, rows, table.size(0)).to(table.scalar_type(), false, /*copy=*/true)};
  }

  static Tensor shard_sums(const Tensor& distances, const Tensor& partners, const Tensor& anchors,
                           const Tensor& margins, const c10::optional<Tensor>& longest, const Tensor& overflow,
                           const Tensor& checks, c10::string_view form, double apc_margin, int64_t bins) {
    const Form loss_form = parse_form(form);
    check_shard_sums_args(distances, partners, anchors, margins, longest, overflow, checks, loss_form, apc_margin,
                          bins);
    typename Device::Guard guard(distances);
    const Tensor sums = Device::pair_sums(distances.contiguous(), partners.contiguous(), margins,
                                          longest.value_or(Tensor()), loss_form, apc_margin, bins);
    const Tensor counted = Device::pair_counts(anchors.contiguous(), partners.contiguous());
    return Device::partial_vector(sums, counted, overflow, checks, PartialLayout{loss_form, partners.size(1), bins});
  }

  static std::tuple<Tensor, Tensor> shard_sums_backward(const Tensor& grad, const Tensor& distances,
                                                        const Tensor& partners, const Tensor& margins,
                                                        const c10::optional<Tensor>& longest, c10::string_view form,
                                                        double apc_margin, int64_t bins, bool margins_grad) {
    const Form loss_form = parse_form(form);
    check_pair_sums_args(distances, partners, margins, longest, loss_form, apc_margin, bins);
    const PartialLayout layout{loss_form, partners.size(1), bins};
    check_partial(grad, "grad", layout);
    typename Device::Guard guard(distances);
    const Tensor grad_sums = grad.narrow(0, 0, layout.sums())
                                 .view(pair_sums_shape(loss_form, layout.attributes, bins))
                                 .to(distances.scalar_type());
    return Device::pair_sums_backward(grad_sums, distances.contiguous(), partners.contiguous(), margins,
                                      longest.value_or(Tensor()), loss_form, apc_margin, bins, margins_grad);
  }

  static std::tuple<Tensor, Tensor, Tensor> shard_loss(const Tensor& total, int64_t num_attributes,
                                                       c10::string_view form, int64_t bins,
                                                       c10::string_view reduction, at::ScalarType dtype,
                                                       int64_t world_size, bool validate) {
    const PartialLayout layout{parse_form(form), num_attributes, bins};
    check_shard_loss_args(total, layout, dtype);
    TORCH_CHECK_VALUE(world_size >= 1, "crl_ops: world_size must be >= 1, got ", world_size);
    const Reduction mean = parse_reduction(reduction);
    typename Device::Guard guard(total);
    return Device::shard_loss(total, layout, mean, dtype, world_size, validate);
  }

  static Tensor shard_loss_backward(const Tensor& grad, const Tensor& total, int64_t num_attributes,
                                    c10::string_view form, int64_t bins, c10::string_view reduction,
                                    at::ScalarType dtype) {
    const PartialLayout layout{parse_form(form), num_attributes, bins};
    check_shard_loss_args(total, layout, dtype);
    TORCH_CHECK_VALUE(grad.numel() == 1 && grad.is_floating_point(), "crl_ops: grad must be a floating scalar, got ",
                      grad.scalar_type(), " ", grad.sizes());
    check_same_device(grad, "grad", total, "total");
    typename Device::Guard guard(total);
    return Device::shard_loss_backward(grad, total, layout, parse_reduction(reduction), dtype);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> crl_loss(
      const Tensor& features, const Tensor& logits, const Tensor& labels_in, const Tensor& num_classes_in,
      const Tensor& margins, c10::string_view mode, c10::string_view form, int64_t k, double apc_margin, int64_t bins,
      double threshold, c10::string_view reduction, bool validate) {
    check_crl_loss_args(features, logits, labels_in, num_classes_in, margins, k, apc_margin, bins, threshold);
    const Mode mining = parse_mode(mode);
    const Form loss_form = parse_form(form);
    const Reduction mean = parse_reduction(reduction);
    typename Device::Guard guard(labels_in);
    const Tensor labels = labels_in.contiguous(), num_classes = num_classes_in.contiguous();
    const int64_t batch = labels.size(0);
    // Labels first, then features, then logits: the order in which the reference reports errors.
    auto [counts, minority, active] = Device::profile(labels, num_classes, max_classes_of(logits), threshold, validate);
    const auto finite = Device::check_finite(features, logits, num_classes, validate);
    Tensor anchors, partners;
    if (mining == Mode::Class) {
      std::tie(anchors, partners) = Device::mine_class(logits, labels, num_classes, active, k, 0, batch);
    } else {
      std::tie(anchors, partners, std::ignore) =
          Device::mine_instance(features, logits, labels, num_classes, active, k, 0, batch);
    }
    const Tensor counted = Device::pair_counts(anchors, partners);
    auto out = Device::loss(features, partners, margins, counted, loss_form, apc_margin, bins, mean, validate, finite);
    return {out.loss, counts, minority, active, anchors, partners, counted, out.distances, out.sums, out.histograms};
  }

  static std::tuple<Tensor, Tensor> crl_loss_backward(const Tensor& grad, const Tensor& loss, const Tensor& features,
                                                      const Tensor& partners, const Tensor& distances,
                                                      const Tensor& margins, const Tensor& pair_counts,
                                                      const Tensor& sums, const Tensor& histograms,
                                                      c10::string_view form, double apc_margin, int64_t bins,
                                                      c10::string_view reduction, bool margins_grad) {
    const Form loss_form = parse_form(form);
    check_crl_loss_backward_args(grad, loss, features, partners, distances, margins, pair_counts, sums, histograms,
                                 loss_form, bins);
    typename Device::Guard guard(features);
    return Device::loss_backward(grad, loss, features, partners.contiguous(), distances.contiguous(), margins,
                                 pair_counts.contiguous(), sums.contiguous(), histograms.contiguous(), loss_form,
                                 apc_margin, bins, parse_reduction(reduction), margins_grad);
  }
};

// The impl lines of TORCH_LIBRARY_IMPL(crl_ops, <key>, m) for a device.
template <typename Device>
void register_entry_points(torch::Library& m) {
  m.impl("profile", &EntryPoints<Device>::profile);
  m.impl("class_lists", &EntryPoints<Device>::class_lists);
  m.impl("mine_class", &EntryPoints<Device>::mine_class);
  m.impl("mine_instance", &EntryPoints<Device>::mine_instance);
  m.impl("pair_distances", &EntryPoints<Device>::pair_distances);
  m.impl("pair_distances_backward", &EntryPoints<Device>::pair_distances_backward);
  m.impl("pair_sums", &EntryPoints<Device>::pair_sums);
  m.impl("pair_sums_backward", &EntryPoints<Device>::pair_sums_backward);
  m.impl("shard_mine", &EntryPoints<Device>::shard_mine);
  m.impl("shard_table", &EntryPoints<Device>::shard_table);
  m.impl("shard_table_backward", &EntryPoints<Device>::shard_table_backward);
  m.impl("table_distances", &EntryPoints<Device>::table_distances);
  m.impl("table_distances_backward", &EntryPoints<Device>::table_distances_backward);
  m.impl("shard_sums", &EntryPoints<Device>::shard_sums);
  m.impl("shard_sums_backward", &EntryPoints<Device>::shard_sums_backward);
  m.impl("shard_loss", &EntryPoints<Device>::shard_loss);
  m.impl("shard_loss_backward", &EntryPoints<Device>::shard_loss_backward);
  m.impl("crl_loss", &EntryPoints<Device>::crl_loss);
  m.impl("crl_loss_backward", &EntryPoints<Device>::crl_loss_backward);
}

}  // namespace crl
