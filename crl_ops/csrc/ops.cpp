// The crl_ops operator schemas. Kernels: csrc/cpu (CPU), csrc/cuda (CUDA); fake kernels and
// autograd are registered from Python (crl_ops/_native.py). Shapes: B samples, A attributes,
// D feature size, Cmax classes, K mined per side; partners[B, A, 2K] hold positives then
// negatives, -1 where empty (docs/semantics.md).
#include <torch/library.h>

TORCH_LIBRARY(crl_ops, m) {
  // labels[B, A] int64 -> counts[A, Cmax] int64, minority[A, Cmax] bool, active[A, Cmax] bool
  m.def("profile(Tensor labels, int max_classes) -> (Tensor counts, Tensor minority, Tensor active)");
  // scores[B, A, Cmax] class probabilities -> anchors[B, A] bool, partners[B, A, 2K] int64
  m.def("mine_class(Tensor scores, Tensor labels, Tensor active, int k) -> (Tensor anchors, Tensor partners)");
  // features[B, A, D], predictions[B, A] int64 -> anchors, partners (fused distances + top-K)
  m.def(
      "mine_instance(Tensor features, Tensor predictions, Tensor labels, Tensor active, int k) -> "
      "(Tensor anchors, Tensor partners)");
  // The loss forms over the mined pairs. Each forward also returns the pair distances
  // d[B, A, 2K] (0 where empty) and the counts its backward needs; each backward returns the
  // gradient w.r.t. features, through the loss and the distances in one op.
  m.def(
      "relative_loss(Tensor features, Tensor partners, Tensor margins) -> "
      "(Tensor loss, Tensor distances, Tensor num_triplets)");
  m.def(
      "relative_loss_backward(Tensor grad, Tensor features, Tensor partners, Tensor distances, Tensor margins, "
      "Tensor num_triplets) -> Tensor");
  m.def(
      "absolute_loss(Tensor features, Tensor partners, float margin) -> "
      "(Tensor loss, Tensor distances, Tensor num_pairs)");
  m.def(
      "absolute_loss_backward(Tensor grad, Tensor features, Tensor partners, Tensor distances, float margin, "
      "Tensor num_pairs) -> Tensor");
  m.def(
      "distribution_loss(Tensor features, Tensor partners, int bins) -> "
      "(Tensor loss, Tensor distances, Tensor histograms, Tensor scale, Tensor pair_counts)");
  m.def(
      "distribution_loss_backward(Tensor grad, Tensor features, Tensor partners, Tensor distances, int bins, "
      "Tensor histograms, Tensor scale, Tensor pair_counts) -> Tensor");
}
