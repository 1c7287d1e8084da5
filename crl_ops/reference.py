"""The pure-PyTorch reference of every CRL op: the oracle for the native kernels and the fallback
when they are not built.

Each public function has the signature of the native op of the same name (csrc/ops.cpp), on the
inputs `crl_ops._inputs` prepares: labels [B, A] int64, num_classes [A] int64, logits [B, A]
(one binary logit z, meaning the class logits [0, z]) or [B, A, Cmax] (entries past C_j unused),
features [B, A, D]. Vectorised over samples, classes and attributes; no host synchronisation
except the detailed value-error messages on the CPU. Section numbers refer to docs/semantics.md.

Index conventions shared with the kernels:
- `partners[B, A, 2K]`: per sample and attribute, the K mined positives then the K mined
  negatives, sample indices, -1 where empty, order within each half free.
- `d[B, A, 2K]`: the L2 distance of each (sample, partner) pair, 0 where the partner is -1.

The loss is assembled from per-attribute sums and counts (`pair_sums`), so that a caller who
holds only some anchors (crl_ops.distributed) can add sums over processes before `reduce_sums`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._inputs import accumulation_dtype

# ---- values: the checks of validate=True, the flags of validate=False (section 6) -------------------------


def is_annotated(labels: Tensor, num_classes: Tensor) -> Tensor:
    return (labels >= 0) & (labels < num_classes)


def _class_mask(num_classes: Tensor, max_classes: int) -> Tensor:
    """[A, Cmax]: the classes each attribute has."""
    return torch.arange(max_classes, device=num_classes.device) < num_classes[:, None]


def class_logits(logits: Tensor, num_classes: Tensor) -> Tensor:
    """[B, A, Cmax] in the accumulation dtype, -inf past each attribute's C_j (probability 0)."""
    z = logits.to(accumulation_dtype(logits.dtype))
    if z.dim() == 2:
        return torch.stack([torch.zeros_like(z), z], dim=-1)
    return z.masked_fill(~_class_mask(num_classes, z.shape[-1]), -math.inf)


def _logits_finite(logits: Tensor, num_classes: Tensor) -> Tensor:
    finite = torch.isfinite(logits)
    if logits.dim() == 3:
        finite = finite | ~_class_mask(num_classes, logits.shape[-1])
    return finite.all()


def _host_checks_possible(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _values(t: Tensor) -> Tensor:
    """The values under torch.func's wrappers, vmap's batch dimensions first: a check of the whole
    batch is no data-dependent control flow of the transformed function."""
    if torch.compiler.is_compiling():
        return t
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        batch_dim = functorch.maybe_get_bdim(t) if functorch.is_batchedtensor(t) else -1
        t = functorch.get_unwrapped(t)
        if batch_dim >= 0:
            t = t.movedim(batch_dim, 0)
    return t


def _bad_label_element(labels: Tensor, num_classes: Tensor) -> tuple[Tensor, Tensor]:
    """The labels [B, A] and num_classes [A] of the (vmap) batch element with the first bad label."""
    values, classes = _values(labels), _values(num_classes)
    values = values.reshape(-1, *labels.shape)
    classes = classes.reshape(-1, *num_classes.shape).expand(values.shape[0], *num_classes.shape)
    bad = ((values < -1) | (values >= classes.unsqueeze(1))).flatten(1).any(1)
    first = int(bad.nonzero()[0])
    return values[first], classes[first]


def _fail(ok: Tensor, message: str) -> None:
    """Raises ValueError(message) where `ok` is False: at once on the CPU; elsewhere (and while
    torch.compile traces) as an asynchronous device-side assertion, without a host synchronisation."""
    ok = _values(ok).all()
    if _host_checks_possible(ok):
        if not bool(ok):
            raise ValueError(message)
    elif ok.device.type != "meta":
        torch._assert_async(ok, message)


def label_error(labels: Tensor, num_classes: Tensor) -> str:
    """The message for the first label (in row-major order) outside -1..C_j-1."""
    bad = (labels < -1) | (labels >= num_classes)
    i, j = bad.nonzero()[0].tolist()
    return (f"labels[{i}, {j}] = {int(labels[i, j])} is out of range for attribute {j}: expected -1 "
            f"(not annotated) or a class in 0..{int(num_classes[j]) - 1}")


def values_error(name: str) -> str:
    return f"{name} contain NaN or inf; CRL needs finite {name}"


def overflow_error(dtype: torch.dtype) -> str:
    return (f"features are too large: the squared distance of a mined pair overflows {str(dtype).split('.')[-1]}; "
            "scale them down (normalize=True does) or use a wider dtype")


def check_labels(labels: Tensor, num_classes: Tensor, validate: bool) -> Tensor:
    """validate: raises for a label outside -1..C_j-1. Otherwise such a label counts as not
    annotated: returns the labels with -1 there."""
    if validate:
        bad = _values((labels < -1) | (labels >= num_classes)).any()
        if _host_checks_possible(bad):
            if bool(bad):
                raise ValueError(label_error(*_bad_label_element(labels, num_classes)))
        elif bad.device.type != "meta":
            torch._assert_async(~bad, "crl_ops: a label is outside -1..C_j-1")
        return labels
    return torch.where(is_annotated(labels, num_classes), labels, -1)


def check_finite(features: Optional[Tensor], logits: Tensor, num_classes: Tensor, validate: bool) -> Tensor:
    """validate: raises unless the logits (of each attribute's C_j classes) and the features are
    finite. Returns that condition as a 0-dim bool tensor either way."""
    finite_logits = _logits_finite(logits, num_classes)
    finite_features = torch.isfinite(features).all() if features is not None else finite_logits
    if validate:  # logits first: with distance="score" the features are computed from them
        _fail(finite_logits, values_error("logits"))
        if features is not None:
            _fail(finite_features, values_error("features"))
    return finite_features & finite_logits


# ---- 1. profiling -------------------------------------------------------------------------------------------


def profile(labels: Tensor, num_classes: Tensor, max_classes: int, threshold: float,
            validate: bool) -> tuple[Tensor, Tensor, Tensor]:
    """labels [B, A] -> counts [A, Cmax] int64, minority [A, Cmax] bool, active [A, Cmax] bool.

    Minority classes: the longest prefix of the (count, class) order whose counts sum to strictly
    less than threshold * n (n annotated samples, the product in float64); active: those with >= 2.
    """
    labels = check_labels(labels, num_classes, validate)
    labels_t = labels.t()
    valid = labels_t >= 0
    counts = torch.zeros(labels_t.shape[0], max_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels_t.clamp_min(0), valid.long())
    limit = threshold * valid.sum(1, keepdim=True).double()
    # Stable ascending sort orders classes by (count, class index); absent classes sort like count 0.
    order = torch.sort(counts, dim=1, stable=True).indices
    prefix = counts.gather(1, order).cumsum(1)
    in_prefix = prefix.double() < limit
    minority = torch.zeros_like(in_prefix).scatter(1, order, in_prefix) & _class_mask(num_classes, max_classes)
    active = minority & (counts >= 2)
    return counts, minority, active


# ---- 2. mining ---------------------------------------------------------------------------------------------


def _select(keys: Tensor, candidates: Tensor, k: int, largest: bool) -> Tensor:
    """Indices of the k best candidates along the last dim; ties go to the lower index; -1 pads."""
    order = torch.sort(keys, dim=-1, descending=largest, stable=True).indices
    # Move non-candidates behind the candidates, keeping the key order among each group.
    rejected = (~candidates.gather(-1, order)).to(torch.uint8)
    order = order.gather(-1, torch.sort(rejected, dim=-1, stable=True).indices)
    take = min(k, keys.shape[-1])
    chosen = order[..., :take]
    chosen = torch.where(candidates.gather(-1, chosen), chosen, -1)
    if take < k:
        chosen = torch.nn.functional.pad(chosen, (0, k - take), value=-1)
    return chosen


def _anchors(labels: Tensor, active: Tensor) -> Tensor:
    """[B, A] bool: samples whose class is an active minority class of that attribute."""
    attribute = torch.arange(labels.shape[1], device=labels.device)
    return (labels >= 0) & active[attribute, labels.clamp_min(0)]


def class_scores(logits: Tensor, num_classes: Tensor) -> Tensor:
    """p_i(c) [B, A, Cmax] in the accumulation dtype; 0 past C_j."""
    return torch.softmax(class_logits(logits, num_classes), dim=-1)


def predictions(logits: Tensor, num_classes: Tensor) -> Tensor:
    """pred [B, A]: the argmax over each attribute's classes, the lowest class on a tie."""
    return class_logits(logits, num_classes).argmax(-1)


def mine_class(logits: Tensor, labels: Tensor, num_classes: Tensor, active: Tensor, k: int, first_anchor: int,
               num_anchors: int, validate: bool) -> tuple[Tensor, Tensor]:
    """Class level: (anchors [R, A], partners [R, A, 2K]) of the rows first_anchor..+num_anchors, mined
    from the class probabilities of all B samples."""
    check_finite(None, logits, num_classes, validate)
    labels = check_labels(labels, num_classes, validate=False)
    return _mine_class(logits, labels, num_classes, active, k, slice(first_anchor, first_anchor + num_anchors))


def _mine_class(logits: Tensor, labels: Tensor, num_classes: Tensor, active: Tensor, k: int, rows: slice):
    lists = _class_lists(logits, labels, num_classes, active, k)[1]
    return class_rows(lists, labels[rows], active, rows.start)


def class_lists(logits: Tensor, labels: Tensor, num_classes: Tensor, active: Optional[Tensor], k: int,
                validate: bool) -> tuple[Tensor, Tensor]:
    """Class level, before any anchor: for every (attribute j, class c < C_j; only the active
    classes where active [A, Cmax] is given) its K hardest positives (the lowest p(c) in class c)
    and negatives (the highest p(c) among the other annotated samples) among the B rows, best
    first: (keys p(c) [A, Cmax, 2K], indices [A, Cmax, 2K]); index -1 and key +inf (positives) or
    -inf (negatives) where there are fewer."""
    check_finite(None, logits, num_classes, validate)
    return _class_lists(logits, check_labels(labels, num_classes, validate=False), num_classes, active, k)


def _class_lists(logits: Tensor, labels: Tensor, num_classes: Tensor, active: Optional[Tensor],
                 k: int) -> tuple[Tensor, Tensor]:
    scores = class_scores(logits.detach(), num_classes)
    max_classes = scores.shape[2]
    keys = scores.permute(1, 2, 0)  # [A, C, B]
    labels_t = labels.t()[:, None, :]  # [A, 1, B]
    of_class = labels_t == torch.arange(max_classes, device=scores.device)[None, :, None]
    real = _class_mask(num_classes, max_classes)[..., None]  # [A, C, 1]: classes c < C_j
    if active is not None:
        real = real & active[..., None]
    hard_pos = _select(keys, of_class & real, k, largest=False)  # [A, C, K]: lowest p(c) in class c
    hard_neg = _select(keys, (labels_t >= 0) & ~of_class & real, k, largest=True)  # highest p(c) elsewhere
    indices = torch.cat([hard_pos, hard_neg], dim=-1)
    positive_slot = torch.arange(2 * k, device=scores.device) < k
    empty = torch.where(positive_slot, math.inf, -math.inf).to(keys.dtype)  # the worst key of each side
    return torch.where(indices >= 0, keys.gather(-1, indices.clamp_min(0)), empty), indices


def class_rows(lists: Tensor, labels: Tensor, active: Tensor, first_anchor: int) -> tuple[Tensor, Tensor]:
    """Class level: (anchors [R, A], partners [R, A, 2K]) of samples first_anchor.. with labels [R, A]
    (-1: not annotated), from the lists [A, Cmax, 2K] of class_lists: a sample of an active class
    takes its class's positives (without itself) and negatives."""
    k = lists.shape[-1] // 2
    attribute = torch.arange(labels.shape[1], device=labels.device)[None, :]
    rows = lists[attribute, labels.clamp_min(0)]  # [R, A, 2K]
    sample = torch.arange(first_anchor, first_anchor + labels.shape[0], device=labels.device)[:, None, None]
    positives = torch.where(rows[..., :k] == sample, -1, rows[..., :k])  # an anchor is not its own positive
    anchors = _anchors(labels, active)
    partners = torch.where(anchors[..., None], torch.cat([positives, rows[..., k:]], dim=-1), -1)
    return anchors, partners


def mine_instance(features: Tensor, logits: Tensor, labels: Tensor, num_classes: Tensor, active: Tensor, k: int,
                  first_anchor: int, num_anchors: int, validate: bool) -> tuple[Tensor, Tensor]:
    """Instance level: (anchors [R, A], partners [R, A, 2K]) of the rows first_anchor..+num_anchors, by
    feature distance to all B samples."""
    check_finite(features, logits, num_classes, validate)
    labels = check_labels(labels, num_classes, validate=False)
    anchors, partners, overflow = _mine_instance(features, logits, labels, num_classes, active, k,
                                                 slice(first_anchor, first_anchor + num_anchors))
    if validate:
        _fail(~overflow, overflow_error(accumulation_dtype(features.dtype)))
    return anchors, partners


def _mine_instance(features: Tensor, logits: Tensor, labels: Tensor, num_classes: Tensor, active: Tensor, k: int,
                   rows: slice):
    """(anchors, partners, whether a chosen pair's squared distance overflowed)."""
    x = features.detach().to(accumulation_dtype(features.dtype)).transpose(0, 1)  # [A, B, D]
    dist = torch.cdist(x[:, rows], x, compute_mode="donot_use_mm_for_euclid_dist")  # [A, R, B]
    anchors = _anchors(labels[rows], active)
    labels_t = labels.t()
    same = labels_t[:, rows, None] == labels_t[:, None, :]  # [A, anchor, candidate]
    sample = torch.arange(labels.shape[0], device=labels.device)
    not_self = sample[rows, None] != sample[None, :]
    misclassified = (predictions(logits.detach(), num_classes).t() != labels_t)[:, None, :]
    is_anchor = anchors.t()[:, :, None]
    pos_candidates = is_anchor & same & misclassified & not_self
    neg_candidates = is_anchor & ~same & (labels_t >= 0)[:, None, :]
    positives = _select(dist, pos_candidates, k, largest=True)  # farthest misclassified positives
    negatives = _select(dist, neg_candidates, k, largest=False)  # nearest negatives
    chosen = torch.cat([positives, negatives], dim=-1)  # [A, R, 2K]
    overflow = (torch.isinf(dist.gather(-1, chosen.clamp_min(0))) & (chosen >= 0)).any()
    return anchors, chosen.transpose(0, 1).contiguous(), overflow


# ---- 3. the loss forms -----------------------------------------------------------------------------------


def pair_distances(features: Tensor, partners: Tensor, first_anchor: int = 0) -> tuple[Tensor, Tensor]:
    """(d [R, A, 2K], overflow): the L2 distance from anchor row first_anchor + r to its partners, 0
    (and a zero gradient) where empty or equal; and whether a pair's squared distance overflowed.
    features [N, A, D], or [N, 1, D]: one vector shared by the attributes."""
    x = features.to(accumulation_dtype(features.dtype)).expand(-1, partners.shape[1], -1)
    rows = partners.shape[0]
    attribute = torch.arange(x.shape[1], device=x.device)[None, :, None]
    others = x[partners.clamp_min(0), attribute]  # [R, A, 2K, D]
    squared = (x[first_anchor:first_anchor + rows, :, None, :] - others).square().sum(-1)
    is_pair = partners >= 0
    overflow = (torch.isinf(squared) & is_pair).any()
    tiny = torch.finfo(squared.dtype).tiny
    # sqrt of a clamped value: a zero distance gets a zero (not NaN) gradient.
    d = torch.where(squared > 0, squared.clamp_min(tiny).sqrt(), 0.0)
    return torch.where(is_pair, d, 0.0), overflow


def score_distances(scores: Tensor, labels: Tensor, partners: Tensor) -> Tensor:
    """The journal version's class-level score-space distances [B, A, 2K] (section 3): with c the
    anchor's class, |p_a(c) - p_p(c)| to each positive and the signed p_a(c) - p_n(c) to each
    negative; 0 where empty."""
    k = partners.shape[-1] // 2
    own = labels.clamp_min(0)[..., None]  # [B, A, 1]
    anchor_score = scores.gather(-1, own)  # [B, A, 1]
    attribute = torch.arange(scores.shape[1], device=scores.device)[None, :, None]
    partner_score = scores[partners.clamp_min(0), attribute, own.expand_as(partners)]  # [B, A, 2K]
    difference = anchor_score - partner_score
    d = torch.cat([difference[..., :k].abs(), difference[..., k:]], dim=-1)
    return torch.where(partners >= 0, d, 0.0)


class PairSums(NamedTuple):
    """Per attribute [A]: the sums and counts a loss form reduces (semantics section 3).

    relative: first = sum of hinges, first_count = triplets (second, second_count unused: 0).
    absolute: first = sum of positive d^2, first_count = positive pairs; second = sum of negative
    hinge^2, second_count = negative pairs.
    distribution: first = the attribute's histogram loss, first_count = 1 where the attribute has
    both pair kinds (else 0).
    """

    first: Tensor
    second: Tensor
    first_count: Tensor
    second_count: Tensor


def _halves(d: Tensor, partners: Tensor):
    k = partners.shape[-1] // 2
    return d[..., :k], d[..., k:], partners[..., :k] >= 0, partners[..., k:] >= 0


def relative_sums(d: Tensor, partners: Tensor, margins: Tensor) -> PairSums:
    """Eq. 9 per attribute: the sum of max(0, m_j + d(a,p) - d(a,n)) over triplets, and their number."""
    d_pos, d_neg, has_pos, has_neg = _halves(d, partners)
    margin = margins.to(d.dtype)[None, :, None, None]
    hinge = torch.relu(margin + d_pos[..., :, None] - d_neg[..., None, :])  # [R, A, K, K]
    is_triplet = has_pos[..., :, None] & has_neg[..., None, :]
    total = torch.where(is_triplet, hinge, 0.0).sum((0, 2, 3))
    count = is_triplet.sum((0, 2, 3))
    return PairSums(total, torch.zeros_like(total), count, torch.zeros_like(count))


def absolute_sums(d: Tensor, partners: Tensor, margin: float) -> PairSums:
    """Eq. 11 per attribute: sums of d^2 over positive pairs and of max(0, m - d)^2 over negative pairs."""
    d_pos, d_neg, has_pos, has_neg = _halves(d, partners)
    pos = torch.where(has_pos, d_pos.square(), 0.0).sum((0, 2))
    neg = torch.where(has_neg, torch.relu(margin - d_neg).square(), 0.0).sum((0, 2))
    return PairSums(pos, neg, has_pos.sum((0, 2)), has_neg.sum((0, 2)))


def histogram_nodes(d: Tensor, scale: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Linear interpolation onto `bins` nodes: node index t (no gradient) and weight w of node t + 1.

    u = d * scale with scale = (bins - 1) / R; t = min(floor(u), bins - 2), NaN taken as 0; w = u - t.
    """
    u = d * scale
    t = torch.nan_to_num(torch.floor(u.detach()), nan=0.0).clamp(0, bins - 2)
    return t.long(), u - t


def histogram_scale(longest: Tensor, bins: int) -> Tensor:
    """(bins - 1) / R by a true division (as the kernels: a reciprocal times bins - 1 rounds
    differently and moves distances that fall on a node); 0 where R = 0 (every pair on node 0)."""
    return torch.where(longest > 0, torch.full_like(longest, bins - 1) / longest, 0.0)


def histograms(d: Tensor, partners: Tensor, longest: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Unnormalised histograms [A, 2, bins] (positives, negatives) of the pair distances on
    `bins` nodes over [0, R_j], and the pair counts [A, 2]."""
    num_attributes = d.shape[1]
    k = partners.shape[-1] // 2
    is_pair = partners >= 0
    is_neg = torch.zeros_like(is_pair)
    is_neg[..., k:] = True
    node, weight = histogram_nodes(d, histogram_scale(longest, bins)[None, :, None], bins)
    attribute = torch.arange(num_attributes, device=d.device)[None, :, None]
    flat = ((attribute * 2 + is_neg.long()) * bins + node).flatten()
    weight = torch.where(is_pair, weight, 0.0).flatten()
    lower = torch.where(is_pair.flatten(), 1.0 - weight, 0.0)
    hist = torch.zeros(num_attributes * 2 * bins, dtype=d.dtype, device=d.device)
    hist = hist.index_add(0, flat, lower).index_add(0, flat + 1, weight).view(num_attributes, 2, bins)
    counts = torch.stack([is_pair[..., :k].sum((0, 2)), is_pair[..., k:].sum((0, 2))], dim=1)
    return hist, counts


def longest_distance(d: Tensor, partners: Tensor) -> Tensor:
    """R_j [A]: the largest pair distance of each attribute (no gradient)."""
    return torch.where(partners >= 0, d.detach(), 0.0).amax(dim=(0, 2))


def histogram_overlap(hist: Tensor, counts: Tensor) -> PairSums:
    """Eq. 12-14 per attribute from the histograms [A, 2, bins] and pair counts [A, 2]."""
    h_pos = hist[:, 0] / counts[:, 0].clamp_min(1)[:, None]
    h_neg = hist[:, 1] / counts[:, 1].clamp_min(1)[:, None]
    counted = (counts[:, 0] > 0) & (counts[:, 1] > 0)
    per_attribute = torch.where(counted, (h_pos * h_neg.cumsum(-1)).sum(-1), 0.0)
    return PairSums(per_attribute, torch.zeros_like(per_attribute), counted.long(), torch.zeros_like(counts[:, 0]))


def distribution_sums(d: Tensor, partners: Tensor, bins: int) -> PairSums:
    hist, counts = histograms(d, partners, longest_distance(d, partners), bins)
    return histogram_overlap(hist, counts)


def _mean(total: Tensor, count: Tensor) -> Tensor:
    return total / count.clamp_min(1)


def reduce_sums(form: str, sums: PairSums, reduction: str) -> Tensor:
    """The loss from per-attribute sums (semantics section 3): a pooled mean over all triplets or
    pairs of all attributes ("pooled"), or the mean over attributes with terms of each attribute's
    own mean ("attribute"). The distribution form is always a mean over attributes."""
    if form == "distribution" or reduction == "attribute":
        if form == "relative":
            per_attribute, has_terms = _mean(sums.first, sums.first_count), sums.first_count > 0
        elif form == "absolute":
            per_attribute = 0.5 * (_mean(sums.first, sums.first_count) + _mean(sums.second, sums.second_count))
            has_terms = (sums.first_count > 0) | (sums.second_count > 0)
        else:
            per_attribute, has_terms = sums.first, sums.first_count > 0
        return _mean(torch.where(has_terms, per_attribute, 0.0).sum(), has_terms.sum())
    if form == "relative":
        return _mean(sums.first.sum(), sums.first_count.sum())
    return 0.5 * (_mean(sums.first.sum(), sums.first_count.sum()) + _mean(sums.second.sum(), sums.second_count.sum()))


def form_sums(form: str, d: Tensor, partners: Tensor, margins: Tensor, apc_margin: float, bins: int) -> PairSums:
    if form == "relative":
        return relative_sums(d, partners, margins)
    if form == "absolute":
        return absolute_sums(d, partners, apc_margin)
    return distribution_sums(d, partners, bins)


def pair_sums(d: Tensor, partners: Tensor, margins: Tensor, longest: Optional[Tensor], form: str, apc_margin: float,
              bins: int) -> Tensor:
    """The per-attribute sums of a form, which add over disjoint sets of anchors (the op
    crl_ops::pair_sums): [A, 2] for relative (hinge sums, 0) and absolute (sums of positive d^2 and
    of negative hinge^2); for distribution the unnormalised histograms [A, 2, bins] on the nodes over
    [0, longest_j]."""
    if form == "distribution":
        return histograms(d, partners, longest, bins)[0]
    sums = relative_sums(d, partners, margins) if form == "relative" else absolute_sums(d, partners, apc_margin)
    return torch.stack([sums.first, sums.second], dim=1)


def pair_sums_with_counts(form: str, sums: Tensor, pair_counts: Tensor) -> PairSums:
    """PairSums from pair_sums' output and the pair counts [A, 4] of the same anchors."""
    if form == "distribution":
        return histogram_overlap(sums, pair_counts[:, 1:3])
    if form == "relative":
        return PairSums(sums[:, 0], sums[:, 1], pair_counts[:, 3], torch.zeros_like(pair_counts[:, 3]))
    return PairSums(sums[:, 0], sums[:, 1], pair_counts[:, 1], pair_counts[:, 2])


def pair_counts(anchors: Tensor, partners: Tensor) -> Tensor:
    """[A, 4] int64 per attribute: anchors, positive pairs, negative pairs, triplets."""
    k = partners.shape[-1] // 2
    has_pos = (partners[..., :k] >= 0).sum(-1)  # [B, A]
    has_neg = (partners[..., k:] >= 0).sum(-1)
    return torch.stack([anchors.sum(0), has_pos.sum(0), has_neg.sum(0), (has_pos * has_neg).sum(0)], dim=1)


def poison(loss: Tensor, features: Tensor, ok: Tensor) -> Tensor:
    """The loss where `ok`; else NaN, with a NaN gradient for every feature entry (section 6)."""
    nan_unless_ok = torch.where(ok, 0.0, math.nan).to(loss.dtype)
    return torch.where(ok, loss, math.nan) + nan_unless_ok * features.sum().to(loss.dtype)


# ---- the steps of crl_ops.distributed, as the native shard_* ops ------------------------------------------------


def shard_mine(vectors: Optional[Tensor], logits: Tensor, labels: Tensor, num_classes: Tensor, mode: str, k: int,
               threshold: float, first_anchor: int, num_anchors: int, partner_rows: bool, validate: bool):
    """On the gathered batch: (counts, minority, active) of its profile (validate: a bad label
    raises), the (anchors, partners) of the rows first_anchor..+num_anchors, checks [2] bool:
    whether those rows' logits, and their vectors (when given) or logits, are not finite, and the
    class lists (partner_rows, see the op's schema). vectors: instance mode, the gathered ones;
    class mode, this rank's rows."""
    counts, minority, active = profile(labels, num_classes, logits.shape[-1] if logits.dim() == 3 else 2, threshold,
                                       validate)
    labels = check_labels(labels, num_classes, validate=False)
    rows = slice(first_anchor, first_anchor + num_anchors)
    logits_finite = _logits_finite(logits.detach()[rows], num_classes)
    own_vectors = None if vectors is None else vectors.detach() if mode == "class" else vectors.detach()[rows]
    all_finite = logits_finite if own_vectors is None else logits_finite & torch.isfinite(own_vectors).all()
    lists = labels.new_empty(0)
    if partner_rows:
        lists = _class_lists(logits, labels, num_classes, active, k)[1]
        anchors, partners = class_rows(lists, labels[rows], active, first_anchor)
        slot = torch.arange(2 * k, device=labels.device)
        partners = torch.where(partners >= 0, num_anchors + labels[rows].clamp_min(0)[..., None] * 2 * k + slot, -1)
    elif mode == "class":
        anchors, partners = _mine_class(logits, labels, num_classes, active, k, rows)
    else:
        anchors, partners, _ = _mine_instance(vectors, logits, labels, num_classes, active, k, rows)
    return counts, minority, active, anchors, partners, torch.stack([~logits_finite, ~all_finite]), lists


def _owned_entries(lists: Tensor, first_anchor: int, rows: Tensor):
    """Where each table entry [Cmax 2K, A] stands among this rank's rows [R, Ax, D]: (row, column:
    its attribute, or 0 for vectors shared by the attributes, whether this rank owns it)."""
    local = lists.permute(1, 2, 0).reshape(-1, lists.shape[0]) - first_anchor
    owned = (local >= 0) & (local < rows.shape[0])
    column = torch.arange(lists.shape[0], device=lists.device).expand_as(local)
    return torch.where(owned, local, 0), column if rows.shape[1] > 1 else torch.zeros_like(column), owned


def shard_table(vectors: Tensor, lists: Tensor, first_anchor: int) -> Tensor:
    """This rank's entries of the partner table [Cmax 2K, A, D]: table[c 2K + s, j] = the vector of
    row lists[j, c, s] for attribute j where this rank holds that row (vectors [R, Ax, D] are rows
    first_anchor..), 0 elsewhere."""
    row, column, owned = _owned_entries(lists, first_anchor, vectors)
    if vectors.shape[0] == 0:
        return vectors.new_zeros((*row.shape, vectors.shape[2]))
    return torch.where(owned[..., None], vectors[row, column], 0.0)


def shard_table_backward(grad_table: Tensor, grad_rows: Tensor, lists: Tensor, first_anchor: int,
                         grad_scale: Tensor) -> Tensor:
    """grad_rows [R, Ax, D] plus the table's gradient at this rank's entries, times grad_scale."""
    row, column, owned = _owned_entries(lists, first_anchor, grad_rows)
    grad = grad_rows.clone().index_put_((row[owned], column[owned]), grad_table[owned].to(grad_rows.dtype),
                                        accumulate=True)
    return grad * grad_scale


def _joined(vectors: Tensor, table: Tensor) -> Tensor:
    return torch.cat([vectors.expand(-1, table.shape[1], -1), table])


def table_distances(vectors: Tensor, table: Tensor, partners: Tensor):
    """(distances, overflow) of pair_distances from the anchors vectors [R, Ax, D] to their partners,
    rows of [vectors; table], and the longest distance of each attribute [A]."""
    d, overflow = pair_distances(_joined(vectors, table), partners, 0)
    longest = longest_distance(d, partners) if d.shape[0] else d.new_zeros(d.shape[1])
    return d, overflow, longest


def table_distances_backward(grad: Tensor, vectors: Tensor, table: Tensor, partners: Tensor, distances: Tensor):
    """(d loss / d vectors, d loss / d table) for the distances' gradient `grad`."""
    with torch.enable_grad():
        leaves = vectors.detach().requires_grad_(), table.detach().requires_grad_()
        d, _ = pair_distances(_joined(*leaves), partners, 0)
        return torch.autograd.grad(d, leaves, grad)


def _partial_sizes(num_attributes: int, form: str, bins: int) -> list:
    """The pieces of the partial sums vector: pair_sums' output, the pair counts, three flags."""
    return [2 * num_attributes * (bins if form == "distribution" else 1), 4 * num_attributes, 3]


def shard_sums(d: Tensor, partners: Tensor, anchors: Tensor, margins: Tensor, longest: Optional[Tensor],
               overflow: Tensor, checks: Tensor, form: str, apc_margin: float, bins: int) -> Tensor:
    """The partial sums vector of a rank's pairs (float64): pair_sums, pair_counts, and the flags
    (overflow, non-finite logits, non-finite features or logits), which add over the ranks."""
    sums = pair_sums(d, partners, margins, longest, form, apc_margin, bins)
    return torch.cat([sums.flatten().double(), pair_counts(anchors, partners).flatten().double(),
                      overflow.reshape(1).double(), checks.double()])


def shard_loss(total: Tensor, num_attributes: int, form: str, bins: int, reduction: str, dtype: torch.dtype,
               world_size: int, validate: bool):
    """From the ranks' summed partial sums: (loss in dtype, pair_counts [A, 4], grad_scale); a set
    flag raises with validate (logits, then features, then overflow) and makes the loss, every
    gradient and grad_scale NaN; else grad_scale = world_size."""
    sums, counts, flags = total.split(_partial_sizes(num_attributes, form, bins))
    if validate:
        _fail(flags[1] <= 0, values_error("logits"))
        _fail(flags[2] <= 0, values_error("features"))
        _fail(flags[0] <= 0, overflow_error(dtype))
    counts = counts.view(num_attributes, 4).long()
    sums = sums.view(num_attributes, 2, bins) if form == "distribution" else sums.view(num_attributes, 2)
    ok = (flags <= 0).all()
    loss = reduce_sums(form, pair_sums_with_counts(form, sums.to(dtype), counts), reduction)
    grad_scale = torch.where(ok, float(world_size), math.nan).to(dtype)
    return poison(loss, total, ok), counts, grad_scale


# ---- the whole loss, as the native crl_loss op ---------------------------------------------------------------


def crl_loss(features: Tensor, logits: Tensor, labels: Tensor, num_classes: Tensor, margins: Tensor, mode: str,
             form: str, k: int, apc_margin: float, bins: int, threshold: float, reduction: str, validate: bool):
    """l_crl and what was mined: (loss, counts, minority, active, anchors, partners, pair_counts)."""
    labels = check_labels(labels, num_classes, validate)
    finite = check_finite(features, logits, num_classes, validate)
    counts, minority, active = profile(labels, num_classes, logits.shape[-1] if logits.dim() == 3 else 2,
                                       threshold, validate=False)
    rows = slice(0, labels.shape[0])
    if mode == "class":
        anchors, partners = _mine_class(logits, labels, num_classes, active, k, rows)
    else:
        anchors, partners, _ = _mine_instance(features, logits, labels, num_classes, active, k, rows)
    d, overflow = pair_distances(features, partners)
    if validate:
        _fail(~overflow, overflow_error(d.dtype))
    loss = reduce_sums(form, form_sums(form, d, partners, margins, apc_margin, bins), reduction)
    if not validate:
        loss = poison(loss, features, finite & ~overflow)
    return loss, counts, minority, active, anchors, partners, pair_counts(anchors, partners)
