// The crl_ops operator schemas, defined once: ops.cpp registers them as the `crl_ops` library (the
// tests' emulated CUDA device, csrc/emulation, under a namespace of its own). Kernels: csrc/cpu
// (CPU), csrc/cuda (CUDA), both through the glue of common/entry_points.h; autograd:
// csrc/autograd.cpp; fake kernels: crl_ops/_native.py.
//
// Shapes: B samples, A attributes, D feature size, Cmax classes, K mined per side.
// - labels[B, A] int64, -1 = not annotated; num_classes[A] int64 (C_j).
// - logits[B, A] (one binary logit z: class logits [0, z]) or [B, A, Cmax] (entries past C_j unread).
// - partners[R, A, 2K]: the K positives then the K negatives of each anchor row, -1 where empty.
// - validate: check label ranges and finite values (a ValueError on the CPU, a device-side
//   assertion on CUDA); else labels outside -1..C_j-1 count as not annotated and non-finite
//   values make the loss NaN (docs/semantics.md, section 6).
#pragma once

#include <torch/library.h>

namespace crl {

inline void define_op_schemas(torch::Library& m) {
  // Section 1: counts[A, Cmax] int64, minority[A, Cmax] bool, active[A, Cmax] bool.
  m.def("profile(Tensor labels, Tensor num_classes, int max_classes, float threshold, bool validate) -> "
        "(Tensor counts, Tensor minority, Tensor active)");
  // Section 2, class level, before any anchor: for every (attribute j, class c < C_j; with active
  // [A, Cmax], only its active classes, the other lists empty) its K hardest
  // positives (the lowest p(c) in class c) and negatives (the highest p(c) among the other annotated
  // samples) among the B rows, best first: keys p(c) [A, Cmax, 2K] in the accumulation dtype and
  // indices [A, Cmax, 2K] int64 (-1, key +inf for positives and -inf for negatives, where fewer).
  // shard_mine (crl_ops.distributed) builds class mode's partner table from the same lists.
  m.def("class_lists(Tensor logits, Tensor labels, Tensor num_classes, Tensor? active, int k, bool validate) -> "
        "(Tensor keys, Tensor indices)");
  // Section 2, for the anchor rows first_anchor..first_anchor + num_anchors against all B
  // candidates: anchors[R, A] bool, partners[R, A, 2K] int64.
  m.def("mine_class(Tensor logits, Tensor labels, Tensor num_classes, Tensor active, int k, SymInt first_anchor, "
        "SymInt num_anchors, bool validate) -> (Tensor anchors, Tensor partners)");
  m.def("mine_instance(Tensor features, Tensor logits, Tensor labels, Tensor num_classes, Tensor active, int k, "
        "SymInt first_anchor, SymInt num_anchors, bool validate) -> (Tensor anchors, Tensor partners)");
  // Section 3 on given pairs, in two differentiable steps whose sums add over disjoint sets of
  // anchors (crl_ops.distributed: a rank's own anchors against the gathered batch).
  // pair_distances: for the anchor rows first_anchor..first_anchor + R of vectors[N, Ax, D] (Ax = A,
  // or 1: one vector shared by the attributes) and their partners[R, A, 2K] (rows of vectors), the
  // distances[R, A, 2K] in the accumulation dtype (0 where empty) and overflow (0-dim bool: a
  // pair's squared distance is infinite). Differentiable w.r.t. vectors.
  m.def("pair_distances(Tensor vectors, Tensor partners, SymInt first_anchor) -> (Tensor distances, Tensor overflow)");
  m.def("pair_distances_backward(Tensor grad, Tensor vectors, Tensor partners, Tensor distances, SymInt first_anchor) "
        "-> Tensor");
  // pair_sums: per attribute, relative [A, 2] (hinge sum, 0); absolute [A, 2] (sums of positive d^2
  // and of negative hinge(apc_margin - d)^2); distribution [A, 2, bins] (the unnormalised histograms
  // of positives and negatives on the nodes over [0, longest_j]; longest [A] required).
  // Differentiable w.r.t. distances and margins.
  m.def("pair_sums(Tensor distances, Tensor partners, Tensor margins, Tensor? longest, str form, float apc_margin, "
        "int bins) -> Tensor");
  m.def("pair_sums_backward(Tensor grad, Tensor distances, Tensor partners, Tensor margins, Tensor? longest, "
        "str form, float apc_margin, int bins, bool margins_grad) -> (Tensor grad_distances, Tensor grad_margins)");
  // The steps of crl_ops.distributed, a rank's share of the global batch's loss (docs/scaling.md). The
  // partial sums of the ranks add up; they travel as one float64 vector `partial` [S + 4A + 3]: the
  // pair_sums output (S = 2A, or 2A bins for the distribution form), the pair counts [A, 4], and three
  // flags: an overflowing pair distance, non-finite logits, non-finite features or logits.
  // shard_mine: on the gathered batch (every rank the same), the profile (validate: a bad label raises
  // on every rank alike) and the mining of the anchor rows first_anchor..first_anchor + num_anchors;
  // checks [2] bool: whether those rows' logits, and their vectors (when given) or logits, are not
  // finite. vectors: instance mode, the gathered [N, Ax, D] (mined against); class mode, this rank's
  // own rows [R, Ax, D] (only checked). partner_rows (class mode): the partners as rows of [own rows;
  // table] (common/partner_rows.h) and lists [A, Cmax, 2K], the class lists (rows of the gathered
  // batch); otherwise partners are rows of the gathered batch and lists is empty.
  m.def("shard_mine(Tensor? vectors, Tensor logits, Tensor labels, Tensor num_classes, str mode, int k, "
        "float threshold, SymInt first_anchor, SymInt num_anchors, bool partner_rows, bool validate) -> "
        "(Tensor counts, Tensor minority, Tensor active, Tensor anchors, Tensor partners, Tensor checks, "
        "Tensor lists)");
  // shard_table: this rank's entries of the partner table [Cmax 2K, A, D] (the rows first_anchor.. of
  // the lists that vectors [R, Ax, D] holds), 0 elsewhere; the ranks' tables sum to the whole.
  // shard_table_backward: grad_rows [R, Ax, D] plus the table's gradient at this rank's entries,
  // times grad_scale (0-dim).
  m.def("shard_table(Tensor vectors, Tensor lists, SymInt first_anchor) -> Tensor");
  m.def("shard_table_backward(Tensor grad_table, Tensor grad_rows, Tensor lists, SymInt first_anchor, "
        "Tensor grad_scale) -> Tensor");
  // table_distances: pair_distances of the anchors vectors [R, Ax, D] to their partners (rows of [own
  // rows; table]), and longest [A], the largest distance of each attribute. Its backward: the
  // gradients of the vectors and of the table.
  m.def("table_distances(Tensor vectors, Tensor table, Tensor partners) -> (Tensor distances, Tensor overflow, "
        "Tensor longest)");
  m.def("table_distances_backward(Tensor grad, Tensor vectors, Tensor table, Tensor partners, Tensor distances) -> "
        "(Tensor grad_vectors, Tensor grad_table)");
  // shard_sums: `partial` of the mined pairs (their distances, overflow flag and checks). Differentiable
  // w.r.t. distances and margins.
  m.def("shard_sums(Tensor distances, Tensor partners, Tensor anchors, Tensor margins, Tensor? longest, "
        "Tensor overflow, Tensor checks, str form, float apc_margin, int bins) -> Tensor");
  m.def("shard_sums_backward(Tensor grad, Tensor distances, Tensor partners, Tensor margins, Tensor? longest, "
        "str form, float apc_margin, int bins, bool margins_grad) -> (Tensor grad_distances, Tensor grad_margins)");
  // shard_loss: from the sum over the ranks of `partial`, the loss (in dtype; NaN where a flag is set,
  // and validate: the flag's error, logits before features before overflow), pair_counts [A, 4] and
  // grad_scale, the factor of a rank's gradient: world_size (docs/scaling.md), NaN where a flag is set.
  // Differentiable w.r.t. total.
  m.def("shard_loss(Tensor total, int num_attributes, str form, int bins, str reduction, ScalarType dtype, "
        "int world_size, bool validate) -> (Tensor loss, Tensor pair_counts, Tensor grad_scale)");
  m.def("shard_loss_backward(Tensor grad, Tensor total, int num_attributes, str form, int bins, str reduction, "
        "ScalarType dtype) -> Tensor");
  // The whole loss of sections 1-3 in one op (one dispatch and one autograd node per step):
  // loss; counts, minority, active; anchors[B, A], partners[B, A, 2K]; pair_counts[A, 4] (anchors,
  // positive pairs, negative pairs, triplets); and for the backward: distances[B, A, 2K], sums[A, 2]
  // (relative: hinge sum, 0; absolute: positive and negative sums; distribution: the attribute's
  // loss and its histogram scale (bins - 1) / R) and the normalised histograms[A, 2, bins]
  // (distribution form; [A, 2, 0] otherwise). Differentiable w.r.t. features and margins.
  m.def("crl_loss(Tensor features, Tensor logits, Tensor labels, Tensor num_classes, Tensor margins, str mode, "
        "str form, int k, float apc_margin, int bins, float threshold, str reduction, bool validate) -> "
        "(Tensor loss, Tensor counts, Tensor minority, Tensor active, Tensor anchors, Tensor partners, "
        "Tensor pair_counts, Tensor distances, Tensor sums, Tensor histograms)");
  // d loss / d features [B, A, D] (contiguous, the features' dtype) and, with margins_grad,
  // d loss / d margins [A] (else an empty tensor). A NaN loss gives NaN gradients.
  m.def("crl_loss_backward(Tensor grad, Tensor loss, Tensor features, Tensor partners, Tensor distances, "
        "Tensor margins, Tensor pair_counts, Tensor sums, Tensor histograms, str form, float apc_margin, int bins, "
        "str reduction, bool margins_grad) -> (Tensor grad_features, Tensor grad_margins)");
}

}  // namespace crl
