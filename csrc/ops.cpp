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
  // distances[B, A, 2K] between each sample and its partners (0 where empty)
  m.def("pair_distances(Tensor features, Tensor partners) -> Tensor");
  m.def("pair_distances_backward(Tensor grad, Tensor features, Tensor partners, Tensor distances) -> Tensor");
  // The loss forms on the pair distances; the extra outputs are what their backward needs.
  m.def("relative_loss(Tensor distances, Tensor partners, Tensor margins) -> (Tensor loss, Tensor num_triplets)");
  m.def(
      "relative_loss_backward(Tensor grad, Tensor distances, Tensor partners, Tensor margins, "
      "Tensor num_triplets) -> Tensor");
  m.def("absolute_loss(Tensor distances, Tensor partners, float margin) -> (Tensor loss, Tensor num_pairs)");
  m.def(
      "absolute_loss_backward(Tensor grad, Tensor distances, Tensor partners, float margin, "
      "Tensor num_pairs) -> Tensor");
  m.def(
      "distribution_loss(Tensor distances, Tensor partners, int bins) -> "
      "(Tensor loss, Tensor histograms, Tensor scale, Tensor pair_counts)");
  m.def(
      "distribution_loss_backward(Tensor grad, Tensor distances, Tensor partners, int bins, "
      "Tensor histograms, Tensor scale, Tensor pair_counts) -> Tensor");
}
