// Argument checks shared by the CPU and CUDA entry points, so a bad call
// of torch.ops.crl_ops.* fails with the same clear message on either backend.
#pragma once

#include <ATen/ATen.h>

namespace crl {

inline void check_int64(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, "crl_ops: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "crl_ops: ", name, " must be int64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), "crl_ops: ", name_a, " is on ", a.device(), " but ", name_b, " is on ",
              b.device());
}

inline void check_labels(const at::Tensor& labels) {
  check_int64(labels, "labels", 2, "[B, A]");
}

inline void check_active(const at::Tensor& active, const at::Tensor& labels) {
  TORCH_CHECK(active.dim() == 2 && active.size(0) == labels.size(1) && active.scalar_type() == at::kBool,
              "crl_ops: active must be a bool tensor [A, Cmax] with A = ", labels.size(1), ", got ",
              active.scalar_type(), " ", active.sizes());
  check_same_device(labels, "labels", active, "active");
}

inline void check_k(int64_t k) {
  TORCH_CHECK(k >= 1, "crl_ops: k must be >= 1, got ", k);
}

inline void check_features(const at::Tensor& features) {
  TORCH_CHECK(features.dim() == 3, "crl_ops: features must have shape [B, A, D], got ", features.sizes());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), "crl_ops: features must be floating point, got ",
              features.scalar_type());
  TORCH_CHECK(features.size(0) < (int64_t(1) << 31), "crl_ops: at most 2^31 - 1 samples");
}

// partners[B, A, 2K] matching features[B, A, D].
inline void check_partners(const at::Tensor& partners, const at::Tensor& features) {
  check_int64(partners, "partners", 3, "[B, A, 2K]");
  TORCH_CHECK(partners.size(0) == features.size(0) && partners.size(1) == features.size(1) &&
                  partners.size(2) % 2 == 0 && partners.size(2) > 0,
              "crl_ops: partners must have shape [B, A, 2K] = [", features.size(0), ", ", features.size(1),
              ", 2K], got ", partners.sizes());
  check_same_device(features, "features", partners, "partners");
}

// distances[B, A, 2K] in the accumulation dtype (float32 or float64), like partners.
inline void check_distances(const at::Tensor& distances, const at::Tensor& partners) {
  TORCH_CHECK(distances.sizes() == partners.sizes(), "crl_ops: distances ", distances.sizes(),
              " and partners ", partners.sizes(), " must have one shape [B, A, 2K]");
  TORCH_CHECK(distances.scalar_type() == at::kFloat || distances.scalar_type() == at::kDouble,
              "crl_ops: distances must be float32 or float64, got ", distances.scalar_type());
  check_int64(partners, "partners", 3, "[B, A, 2K]");
  TORCH_CHECK(partners.size(2) % 2 == 0, "crl_ops: partners must have an even last dimension 2K");
  check_same_device(distances, "distances", partners, "partners");
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- one check per op, covering all its arguments -------------------------------------------------

inline void check_profile_args(const at::Tensor& labels, int64_t max_classes) {
  check_labels(labels);
  TORCH_CHECK(max_classes >= 1, "crl_ops: max_classes must be >= 1, got ", max_classes);
}

inline void check_mine_class_args(const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& active,
                                  int64_t k) {
  check_labels(labels);
  check_active(active, labels);
  check_k(k);
  TORCH_CHECK(scores.dim() == 3 && scores.size(0) == labels.size(0) && scores.size(1) == labels.size(1) &&
                  scores.size(2) == active.size(1),
              "crl_ops: scores must have shape [B, A, Cmax] = [", labels.size(0), ", ", labels.size(1), ", ",
              active.size(1), "], got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "crl_ops: scores must be float32 or float64 probabilities, got ", scores.scalar_type());
  check_same_device(scores, "scores", labels, "labels");
}

inline void check_mine_instance_args(const at::Tensor& features, const at::Tensor& predictions,
                                     const at::Tensor& labels, const at::Tensor& active, int64_t k) {
  check_features(features);
  check_labels(labels);
  check_active(active, labels);
  check_k(k);
  check_int64(predictions, "predictions", 2, "[B, A]");
  TORCH_CHECK(features.size(0) == labels.size(0) && features.size(1) == labels.size(1) &&
                  predictions.sizes() == labels.sizes(),
              "crl_ops: features [B, A, D] ", features.sizes(), ", predictions ", predictions.sizes(), " and labels ",
              labels.sizes(), " must agree on B and A");
  check_same_device(features, "features", labels, "labels");
  check_same_device(features, "features", predictions, "predictions");
}

// A loss op's features[B, A, D] and partners[B, A, 2K].
inline void check_loss_args(const at::Tensor& features, const at::Tensor& partners) {
  check_features(features);
  check_partners(partners, features);
}

inline void check_relative_args(const at::Tensor& features, const at::Tensor& partners, const at::Tensor& margins) {
  check_loss_args(features, partners);
  TORCH_CHECK(margins.dim() == 1 && margins.size(0) == features.size(1), "crl_ops: margins must have shape [A] = [",
              features.size(1), "], got ", margins.sizes());
  check_same_device(margins, "margins", features, "features");
}

inline void check_bins(int64_t bins) {
  TORCH_CHECK(bins >= 2, "crl_ops: bins must be >= 2, got ", bins);
}

// A loss backward op's scalar grad, and the features, partners and distances of its forward.
inline void check_loss_backward_args(const at::Tensor& grad, const at::Tensor& features, const at::Tensor& partners,
                                     const at::Tensor& distances) {
  check_loss_args(features, partners);
  check_distances(distances, partners);
  TORCH_CHECK(distances.scalar_type() == accumulation_type(features.scalar_type()), "crl_ops: distances must be ",
              accumulation_type(features.scalar_type()), " for ", features.scalar_type(), " features, got ",
              distances.scalar_type());
  TORCH_CHECK(grad.numel() == 1, "crl_ops: the loss gradient must be a scalar, got ", grad.sizes());
  check_same_device(grad, "grad", features, "features");
}

inline void check_distribution_backward_args(const at::Tensor& grad, const at::Tensor& features,
                                             const at::Tensor& partners, const at::Tensor& distances, int64_t bins,
                                             const at::Tensor& histograms, const at::Tensor& scale,
                                             const at::Tensor& pair_counts) {
  check_loss_backward_args(grad, features, partners, distances);
  check_bins(bins);
  const int64_t attributes = distances.size(1);
  TORCH_CHECK(histograms.sizes() == at::IntArrayRef({attributes, 2, bins}) &&
                  scale.sizes() == at::IntArrayRef({attributes}) &&
                  pair_counts.sizes() == at::IntArrayRef({attributes, 2}),
              "crl_ops: distribution_loss_backward needs the histograms, scale and pair_counts of its forward");
}

}  // namespace crl
