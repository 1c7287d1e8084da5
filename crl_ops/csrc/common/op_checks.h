// Argument checks and option names shared by the CPU and CUDA entry points, so that a bad call of
// torch.ops.crl_ops.* fails with the same clear message on either backend. These check shapes,
// dtypes, devices and ranges of plain arguments; the values inside tensors (label ranges,
// finiteness) are checked by the kernels themselves (docs/semantics.md, section 6).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/crl_math.h"
#include "common/shard_loss.h"

namespace crl {

constexpr int64_t kMaxK = 1024;
constexpr int64_t kMaxBins = 100000;


inline Mode parse_mode(c10::string_view name) {
  if (name == "class") return Mode::Class;
  TORCH_CHECK_VALUE(name == "instance", "crl_ops: mode must be 'class' or 'instance', got '", std::string(name), "'");
  return Mode::Instance;
}

inline Form parse_form(c10::string_view name) {
  if (name == "relative") return Form::Relative;
  if (name == "absolute") return Form::Absolute;
  TORCH_CHECK_VALUE(name == "distribution", "crl_ops: form must be 'relative', 'absolute' or 'distribution', got '",
                    std::string(name), "'");
  return Form::Distribution;
}

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "pooled") return Reduction::Pooled;
  TORCH_CHECK_VALUE(name == "attribute", "crl_ops: reduction must be 'pooled' or 'attribute', got '",
                    std::string(name), "'");
  return Reduction::Attribute;
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// "float32" or "float64", as Python names the accumulation dtype in its messages.
inline const char* accumulation_name(at::ScalarType t) {
  return accumulation_type(t) == at::kDouble ? "float64" : "float32";
}

// The ValueError message of a mined pair whose squared distance overflows (section 6).
inline std::string overflow_message(at::ScalarType t) {
  return std::string("features are too large: the squared distance of a mined pair overflows ") +
         accumulation_name(t) + "; scale them down (normalize=True does) or use a wider dtype";
}

// The ValueError message of non-finite logits or features (section 6).
inline std::string values_message(const char* name) {
  return std::string(name) + " contain NaN or inf; CRL needs finite " + name;
}

inline bool is_feature_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_int64(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, "crl_ops: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "crl_ops: ", name, " must be int64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "crl_ops: ", name_a, " is on ", a.device(), " but ", name_b, " is on ",
                    b.device());
}

inline void check_range(const char* name, int64_t value, int64_t low, int64_t high) {
  TORCH_CHECK_VALUE(value >= low && value <= high, "crl_ops: ", name, " must be between ", low, " and ", high,
                    ", got ", value);
}

inline void check_k(int64_t k) {
  check_range("k", k, 1, kMaxK);
}

inline void check_bins(int64_t bins) {
  check_range("bins", bins, 2, kMaxBins);
}

inline void check_threshold(double threshold) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold > 0.0 && threshold <= 1.0,
                    "crl_ops: threshold must be in (0, 1], got ", threshold);
}

// labels [B, A] int64 (B < 2^31, A >= 1) and num_classes [A] int64 on the same device.
inline void check_labels(const at::Tensor& labels, const at::Tensor& num_classes) {
  check_int64(labels, "labels", 2, "[B, A]");
  TORCH_CHECK_VALUE(labels.size(0) < (int64_t(1) << 31), "crl_ops: at most 2^31 - 1 samples, got ", labels.size(0));
  TORCH_CHECK_VALUE(labels.size(1) >= 1, "crl_ops: labels must have at least one attribute, got ", labels.sizes());
  check_int64(num_classes, "num_classes", 1, "[A]");
  TORCH_CHECK_VALUE(num_classes.size(0) == labels.size(1), "crl_ops: num_classes must have shape [A] = [",
                    labels.size(1), "], got ", num_classes.sizes());
  check_same_device(labels, "labels", num_classes, "num_classes");
}

// The number of class columns of logits: [B, A] binary (2) or [B, A, Cmax].
inline int64_t max_classes_of(const at::Tensor& logits) {
  return logits.dim() == 3 ? logits.size(2) : 2;
}

// logits [B, A] (one binary logit per attribute) or [B, A, Cmax >= 2], floating point, like labels.
inline void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK_VALUE((logits.dim() == 2 || (logits.dim() == 3 && logits.size(2) >= 2)) &&
                        logits.size(0) == labels.size(0) && logits.size(1) == labels.size(1),
                    "crl_ops: logits must have shape [B, A] = [", labels.size(0), ", ", labels.size(1),
                    "] (binary) or [B, A, Cmax >= 2], got ", logits.sizes());
  TORCH_CHECK_TYPE(is_feature_type(logits.scalar_type()), "crl_ops: logits must be float16, bfloat16, float32 or "
                   "float64, got ", logits.scalar_type());
  check_same_device(logits, "logits", labels, "labels");
}

// features [B, A, D >= 1], floating point, like labels.
inline void check_features(const at::Tensor& features, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(features.dim() == 3 && features.size(0) == labels.size(0) && features.size(1) == labels.size(1) &&
                        features.size(2) >= 1,
                    "crl_ops: features must have shape [B, A, D >= 1] = [", labels.size(0), ", ", labels.size(1),
                    ", D], got ", features.sizes());
  TORCH_CHECK_TYPE(is_feature_type(features.scalar_type()), "crl_ops: features must be float16, bfloat16, float32 or "
                   "float64, got ", features.scalar_type());
  check_same_device(features, "features", labels, "labels");
}

inline void check_active(const at::Tensor& active, const at::Tensor& labels, int64_t max_classes) {
  TORCH_CHECK_VALUE(active.dim() == 2 && active.size(0) == labels.size(1) && active.size(1) == max_classes &&
                        active.scalar_type() == at::kBool,
                    "crl_ops: active must be a bool tensor [A, Cmax] = [", labels.size(1), ", ", max_classes,
                    "], got ", active.scalar_type(), " ", active.sizes());
  check_same_device(labels, "labels", active, "active");
}

inline void check_anchor_rows(int64_t first_anchor, int64_t num_anchors, int64_t batch) {
  TORCH_CHECK_VALUE(first_anchor >= 0 && num_anchors >= 0 && first_anchor + num_anchors <= batch,
                    "crl_ops: the anchor rows first_anchor..first_anchor + num_anchors = ", first_anchor, "..",
                    first_anchor + num_anchors, " must lie within the batch of ", batch);
}

// margins [A], floating point, on the device of `like`.
inline void check_margins(const at::Tensor& margins, int64_t attributes, const at::Tensor& like,
                          const char* like_name) {
  TORCH_CHECK_VALUE(margins.dim() == 1 && margins.size(0) == attributes, "crl_ops: margins must have shape [A] = [",
                    attributes, "], got ", margins.sizes());
  TORCH_CHECK_TYPE(margins.is_floating_point(), "crl_ops: margins must be floating point, got ", margins.scalar_type());
  check_same_device(margins, "margins", like, like_name);
}

// ---- one check per op, covering all its arguments -------------------------------------------------

inline void check_profile_args(const at::Tensor& labels, const at::Tensor& num_classes, int64_t max_classes,
                               double threshold) {
  check_labels(labels, num_classes);
  TORCH_CHECK_VALUE(max_classes >= 2, "crl_ops: max_classes must be >= 2, got ", max_classes);
  check_threshold(threshold);
}

inline void check_mine_args(const at::Tensor* features, const at::Tensor& logits, const at::Tensor& labels,
                            const at::Tensor& num_classes, const at::Tensor& active, int64_t k, int64_t first_anchor,
                            int64_t num_anchors) {
  check_labels(labels, num_classes);
  check_logits(logits, labels);
  if (features != nullptr) check_features(*features, labels);
  check_active(active, labels, max_classes_of(logits));
  check_k(k);
  check_anchor_rows(first_anchor, num_anchors, labels.size(0));
}

inline void check_crl_loss_args(const at::Tensor& features, const at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& num_classes, const at::Tensor& margins, int64_t k, double apc_margin,
                                int64_t bins, double threshold) {
  check_labels(labels, num_classes);
  check_logits(logits, labels);
  check_features(features, labels);
  check_margins(margins, features.size(1), features, "features");
  check_k(k);
  check_bins(bins);
  check_threshold(threshold);
  TORCH_CHECK_VALUE(std::isfinite(apc_margin) && apc_margin >= 0.0, "crl_ops: apc_margin must be finite and >= 0, got ",
                    apc_margin);
}

// partners [R, A, 2K >= 2] int64 on the device of `like`.
inline void check_partners(const at::Tensor& partners, const at::Tensor& like, const char* like_name) {
  check_int64(partners, "partners", 3, "[R, A, 2K]");
  TORCH_CHECK_VALUE(partners.size(1) >= 1 && partners.size(2) >= 2 && partners.size(2) % 2 == 0,
                    "crl_ops: partners must have shape [R, A >= 1, 2K >= 2], got ", partners.sizes());
  check_same_device(partners, "partners", like, like_name);
}

// vectors [N, A or 1, D >= 1] (1: shared by the attributes), partners [R, A, 2K] of the anchor rows
// first_anchor..first_anchor + R of vectors.
inline void check_pair_distances_args(const at::Tensor& vectors, const at::Tensor& partners, int64_t first_anchor) {
  TORCH_CHECK_TYPE(is_feature_type(vectors.scalar_type()), "crl_ops: vectors must be float16, bfloat16, float32 or "
                   "float64, got ", vectors.scalar_type());
  check_partners(partners, vectors, "vectors");
  TORCH_CHECK_VALUE(vectors.dim() == 3 && (vectors.size(1) == partners.size(1) || vectors.size(1) == 1) &&
                        vectors.size(2) >= 1 && vectors.size(0) < (int64_t(1) << 31),
                    "crl_ops: vectors must have shape [N < 2^31, A, D >= 1] or [N, 1, D] with A = ", partners.size(1),
                    " (the partners' attributes), got ", vectors.sizes());
  check_anchor_rows(first_anchor, partners.size(0), vectors.size(0));
}

// `name` [shape of partners] in the accumulation dtype of `type`.
inline void check_pair_values(const at::Tensor& t, const char* name, const at::Tensor& partners, at::ScalarType type) {
  const auto acc = accumulation_type(type);
  TORCH_CHECK_VALUE(t.sizes() == partners.sizes() && t.scalar_type() == acc, "crl_ops: ", name, " must be ",
                    accumulation_name(type), " ", partners.sizes(), " (the shape of partners), got ", t.scalar_type(),
                    " ", t.sizes());
  check_same_device(t, name, partners, "partners");
}

inline void check_pair_distances_backward_args(const at::Tensor& grad, const at::Tensor& vectors,
                                               const at::Tensor& partners, const at::Tensor& distances,
                                               int64_t first_anchor) {
  check_pair_distances_args(vectors, partners, first_anchor);
  check_pair_values(distances, "distances", partners, vectors.scalar_type());
  check_pair_values(grad, "grad", partners, vectors.scalar_type());
}

// distances [R, A, 2K] float32 or float64, partners, margins [A]; longest [A] for the distribution form.
inline void check_pair_sums_args(const at::Tensor& distances, const at::Tensor& partners, const at::Tensor& margins,
                                 const c10::optional<at::Tensor>& longest, Form form, double apc_margin,
                                 int64_t bins) {
  TORCH_CHECK_TYPE(distances.scalar_type() == at::kFloat || distances.scalar_type() == at::kDouble,
                   "crl_ops: distances must be float32 or float64, got ", distances.scalar_type());
  check_partners(partners, distances, "distances");
  check_pair_values(distances, "distances", partners, distances.scalar_type());
  const int64_t attributes = partners.size(1);
  check_margins(margins, attributes, distances, "distances");
  if (form == Form::Distribution) {
    TORCH_CHECK_VALUE(longest.has_value() && longest->dim() == 1 && longest->size(0) == attributes &&
                          longest->is_floating_point(),
                      "crl_ops: the distribution form needs longest, a floating tensor [A] = [", attributes, "]");
    check_same_device(*longest, "longest", distances, "distances");
  }
  check_bins(bins);
  TORCH_CHECK_VALUE(std::isfinite(apc_margin) && apc_margin >= 0.0, "crl_ops: apc_margin must be finite and >= 0, got ",
                    apc_margin);
}

// The shape of pair_sums' output: [A, 2], or [A, 2, bins] for the distribution form.
inline std::vector<int64_t> pair_sums_shape(Form form, int64_t attributes, int64_t bins) {
  if (form == Form::Distribution) return {attributes, 2, bins};
  return {attributes, 2};
}

inline void check_pair_sums_backward_args(const at::Tensor& grad, const at::Tensor& distances,
                                          const at::Tensor& partners, const at::Tensor& margins,
                                          const c10::optional<at::Tensor>& longest, Form form, double apc_margin,
                                          int64_t bins) {
  check_pair_sums_args(distances, partners, margins, longest, form, apc_margin, bins);
  const auto shape = pair_sums_shape(form, partners.size(1), bins);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(shape) && grad.is_floating_point(),
                    "crl_ops: grad must be a floating tensor ", at::IntArrayRef(shape), " (pair_sums' output), got ",
                    grad.sizes());
  check_same_device(grad, "grad", distances, "distances");
}

inline void check_partial(const at::Tensor& t, const char* name, const PartialLayout& layout) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == layout.size() && t.scalar_type() == at::kDouble,
                    "crl_ops: ", name, " must be a float64 vector [", layout.size(), "] (shard_sums' output for A = ",
                    layout.attributes, "), got ", t.scalar_type(), " ", t.sizes());
}

// The mined rows' checks [2] bool and overflow flag (0-dim bool) of shard_sums.
inline void check_shard_sums_args(const at::Tensor& distances, const at::Tensor& partners, const at::Tensor& anchors,
                                  const at::Tensor& margins, const c10::optional<at::Tensor>& longest,
                                  const at::Tensor& overflow, const at::Tensor& checks, Form form, double apc_margin,
                                  int64_t bins) {
  check_pair_sums_args(distances, partners, margins, longest, form, apc_margin, bins);
  TORCH_CHECK_VALUE(anchors.dim() == 2 && anchors.size(0) == partners.size(0) && anchors.size(1) == partners.size(1) &&
                        anchors.scalar_type() == at::kBool,
                    "crl_ops: anchors must be a bool tensor [R, A] = [", partners.size(0), ", ", partners.size(1),
                    "], got ", anchors.scalar_type(), " ", anchors.sizes());
  TORCH_CHECK_VALUE(overflow.dim() == 0 && overflow.scalar_type() == at::kBool,
                    "crl_ops: overflow must be a 0-dim bool tensor, got ", overflow.scalar_type(), " ",
                    overflow.sizes());
  TORCH_CHECK_VALUE(checks.dim() == 1 && checks.size(0) == 2 && checks.scalar_type() == at::kBool,
                    "crl_ops: checks must be a bool tensor [2], got ", checks.scalar_type(), " ", checks.sizes());
  for (const at::Tensor* t : {&anchors, &overflow, &checks}) {
    check_same_device(*t, "every argument", distances, "distances");
  }
}

// vectors [R, Ax, D] (floating) and the class lists [A, Cmax, 2K] int64 of shard_table.
inline void check_table_args(const at::Tensor& vectors, const at::Tensor& lists, int64_t first_anchor) {
  check_int64(lists, "lists", 3, "[A, Cmax, 2K]");
  TORCH_CHECK_VALUE(vectors.dim() == 3 && (vectors.size(1) == lists.size(0) || vectors.size(1) == 1) &&
                        vectors.size(2) >= 1 && is_feature_type(vectors.scalar_type()),
                    "crl_ops: vectors must be a floating tensor [R, A, D] or [R, 1, D] with A = ", lists.size(0),
                    " (the lists' attributes), got ", vectors.scalar_type(), " ", vectors.sizes());
  TORCH_CHECK_VALUE(first_anchor >= 0, "crl_ops: first_anchor must be >= 0, got ", first_anchor);
  check_same_device(lists, "lists", vectors, "vectors");
}

// vectors [R, Ax, D], table [M, A, D] of the same dtype, partners [R, A, 2K] (rows of [vectors; table]).
inline void check_table_distances_args(const at::Tensor& vectors, const at::Tensor& table, const at::Tensor& partners) {
  check_partners(partners, vectors, "vectors");
  TORCH_CHECK_VALUE(table.dim() == 3 && table.size(1) == partners.size(1) && table.scalar_type() ==
                        vectors.scalar_type() && vectors.dim() == 3 && table.size(2) == vectors.size(2) &&
                        vectors.size(0) == partners.size(0) &&
                        (vectors.size(1) == 1 || vectors.size(1) == partners.size(1)),
                    "crl_ops: vectors [R, A or 1, D], table [M, A, D] and partners [R, A, 2K] must agree, got ",
                    vectors.sizes(), " ", vectors.scalar_type(), ", ", table.sizes(), " ", table.scalar_type(), ", ",
                    partners.sizes());
  TORCH_CHECK_VALUE(is_feature_type(vectors.scalar_type()), "crl_ops: vectors must be floating, got ",
                    vectors.scalar_type());
  check_same_device(table, "table", vectors, "vectors");
}

inline void check_shard_loss_args(const at::Tensor& total, const PartialLayout& layout, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(layout.attributes >= 1, "crl_ops: num_attributes must be >= 1, got ", layout.attributes);
  check_bins(layout.bins);
  check_partial(total, "total", layout);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "crl_ops: dtype must be float32 or float64, got ",
                   dtype);
}

// The forward's outputs handed back to crl_loss_backward.
inline void check_crl_loss_backward_args(const at::Tensor& grad, const at::Tensor& loss, const at::Tensor& features,
                                         const at::Tensor& partners, const at::Tensor& distances,
                                         const at::Tensor& margins, const at::Tensor& pair_counts,
                                         const at::Tensor& sums, const at::Tensor& histograms, Form form,
                                         int64_t bins) {
  TORCH_CHECK_VALUE(features.dim() == 3 && features.size(2) >= 1 && is_feature_type(features.scalar_type()),
                    "crl_ops: features must be a floating tensor [B, A, D >= 1], got ", features.sizes());
  const int64_t batch = features.size(0), attributes = features.size(1);
  check_int64(partners, "partners", 3, "[B, A, 2K]");
  TORCH_CHECK_VALUE(partners.size(0) == batch && partners.size(1) == attributes && partners.size(2) % 2 == 0 &&
                        partners.size(2) >= 2,
                    "crl_ops: partners must have shape [B, A, 2K] = [", batch, ", ", attributes, ", 2K], got ",
                    partners.sizes());
  const auto acc = accumulation_type(features.scalar_type());
  TORCH_CHECK_VALUE(distances.sizes() == partners.sizes() && distances.scalar_type() == acc,
                    "crl_ops: distances must be ", acc, " ", partners.sizes(), ", got ", distances.scalar_type(), " ",
                    distances.sizes());
  TORCH_CHECK_VALUE(grad.numel() == 1 && loss.numel() == 1, "crl_ops: grad and loss must be scalars");
  check_margins(margins, features.size(1), features, "features");
  check_int64(pair_counts, "pair_counts", 2, "[A, 4]");
  TORCH_CHECK_VALUE(pair_counts.size(0) == attributes && pair_counts.size(1) == 4, "crl_ops: pair_counts must be [A, 4]");
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == attributes && sums.size(1) == 2 && sums.scalar_type() == acc,
                    "crl_ops: sums must be ", acc, " [A, 2]");
  const int64_t nodes = form == Form::Distribution ? bins : 0;
  TORCH_CHECK_VALUE(histograms.dim() == 3 && histograms.size(0) == attributes && histograms.size(1) == 2 &&
                        histograms.size(2) == nodes && histograms.scalar_type() == acc,
                    "crl_ops: histograms must be ", acc, " [A, 2, ", nodes, "], got ", histograms.sizes());
  for (const at::Tensor* t : {&grad, &loss, &partners, &distances, &margins, &pair_counts, &sums, &histograms}) {
    check_same_device(*t, "every argument", features, "features");
  }
}

}  // namespace crl
