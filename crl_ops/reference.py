"""The pure-PyTorch reference of every CRL op: the oracle for the native kernels and the fallback
when they are not built.

Each function has the signature of the native op of the same name (csrc/ops.cpp), on the
normalised inputs of `crl_ops._inputs.Batch`. Vectorised over samples, classes and attributes;
no host synchronisation. Section numbers refer to docs/semantics.md.

Index conventions shared with the kernels:
- `partners[B, A, 2K]`: per sample and attribute, the K mined positives then the K mined
  negatives, sample indices, -1 where empty, order within each half free.
- `d[B, A, 2K]`: the L2 distance of each (sample, partner) pair, 0 where the partner is -1.
  The three loss forms take features[B, A, D] and partners and measure d themselves, as the
  native loss ops do (one op, one backward, per loss).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._inputs import accumulation_dtype


def profile(labels: Tensor, max_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Section 1. labels [B, A] -> counts [A, Cmax] int64, minority [A, Cmax] bool, active [A, Cmax] bool."""
    labels_t = labels.t()
    valid = labels_t >= 0
    counts = torch.zeros(labels_t.shape[0], max_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels_t.clamp_min(0), valid.long())
    num_valid = valid.sum(1, keepdim=True)
    # Stable ascending sort orders classes by (count, class index).
    order = torch.sort(counts, dim=1, stable=True).indices
    prefix = counts.gather(1, order).cumsum(1)
    in_prefix = 2 * prefix < num_valid  # strictly less than half of the valid samples
    minority = torch.zeros_like(in_prefix).scatter(1, order, in_prefix)
    active = minority & (counts >= 2)
    return counts, minority, active


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


def mine_class(scores: Tensor, labels: Tensor, active: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Section 2, class level. scores [B, A, Cmax] = class probabilities -> (anchors [B, A], partners [B, A, 2K])."""
    batch_size, num_attributes, max_classes = scores.shape
    device = scores.device
    keys = scores.permute(1, 2, 0)  # [A, C, B]
    labels_t = labels.t()[:, None, :]  # [A, 1, B]
    of_class = labels_t == torch.arange(max_classes, device=device)[None, :, None]
    hard_pos = _select(keys, of_class, k, largest=False)  # [A, C, K]: lowest p(c) in class c
    hard_neg = _select(keys, (labels_t >= 0) & ~of_class, k, largest=True)  # highest p(c) elsewhere
    attribute = torch.arange(num_attributes, device=device)[None, :]
    own = labels.clamp_min(0)
    positives = hard_pos[attribute, own]  # [B, A, K]
    negatives = hard_neg[attribute, own]
    sample = torch.arange(batch_size, device=device)[:, None, None]
    positives = torch.where(positives == sample, -1, positives)  # an anchor is not its own positive
    anchors = _anchors(labels, active)
    partners = torch.cat([positives, negatives], dim=-1)
    partners = torch.where(anchors[..., None], partners, -1)
    return anchors, partners


def mine_instance(features: Tensor, predictions: Tensor, labels: Tensor, active: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Section 2, instance level. features [B, A, D], predictions [B, A] -> (anchors, partners [B, A, 2K])."""
    batch_size = features.shape[0]
    x = features.detach().to(accumulation_dtype(features.dtype)).transpose(0, 1)  # [A, B, D]
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # [A, B, B]
    anchors = _anchors(labels, active)
    labels_t = labels.t()
    same = labels_t[:, :, None] == labels_t[:, None, :]  # [A, anchor, candidate]
    not_self = ~torch.eye(batch_size, dtype=torch.bool, device=features.device)
    misclassified = (predictions.t() != labels_t)[:, None, :]
    is_anchor = anchors.t()[:, :, None]
    pos_candidates = is_anchor & same & misclassified & not_self
    neg_candidates = is_anchor & ~same & (labels_t >= 0)[:, None, :]
    positives = _select(dist, pos_candidates, k, largest=True)  # farthest misclassified positives
    negatives = _select(dist, neg_candidates, k, largest=False)  # nearest negatives
    partners = torch.cat([positives, negatives], dim=-1).transpose(0, 1)
    return anchors, partners.contiguous()


def pair_distances(features: Tensor, partners: Tensor) -> Tensor:
    """d [B, A, 2K]: L2 distance from x[i, j] to x[partners[i, j, m], j]; 0 (and zero gradient) where empty or equal."""
    x = features.to(accumulation_dtype(features.dtype))
    attribute = torch.arange(x.shape[1], device=x.device)[None, :, None]
    others = x[partners.clamp_min(0), attribute]  # [B, A, 2K, D]
    squared = (x[:, :, None, :] - others).square().sum(-1)
    tiny = torch.finfo(squared.dtype).tiny
    # sqrt of a clamped value: a zero distance gets a zero (not NaN) gradient.
    d = torch.where(squared > 0, squared.clamp_min(tiny).sqrt(), 0.0)
    return torch.where(partners >= 0, d, 0.0)


def _halves(d: Tensor, partners: Tensor):
    k = partners.shape[-1] // 2
    return d[..., :k], d[..., k:], partners[..., :k] >= 0, partners[..., k:] >= 0


def relative_loss(features: Tensor, partners: Tensor, margins: Tensor) -> Tensor:
    """Section 3, Eq. 9: mean over all triplets of all attributes of relu(m_j + d(a,p) - d(a,n))."""
    d = pair_distances(features, partners)
    d_pos, d_neg, has_pos, has_neg = _halves(d, partners)
    margin = margins.to(d.dtype)[None, :, None, None]
    hinge = torch.relu(margin + d_pos[..., :, None] - d_neg[..., None, :])  # [B, A, K, K]
    is_triplet = has_pos[..., :, None] & has_neg[..., None, :]
    total = torch.where(is_triplet, hinge, 0.0).sum()
    return total / is_triplet.sum().clamp_min(1)


def absolute_loss(features: Tensor, partners: Tensor, margin: float) -> Tensor:
    """Section 3, Eq. 11: 0.5 * (mean d^2 over positive pairs + mean relu(m - d)^2 over negative pairs)."""
    d = pair_distances(features, partners)
    d_pos, d_neg, has_pos, has_neg = _halves(d, partners)
    pos_term = torch.where(has_pos, d_pos.square(), 0.0).sum() / has_pos.sum().clamp_min(1)
    neg_term = torch.where(has_neg, torch.relu(margin - d_neg).square(), 0.0).sum() / has_neg.sum().clamp_min(1)
    return 0.5 * (pos_term + neg_term)


def histogram_nodes(d: Tensor, scale: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Linear interpolation onto `bins` nodes: node index t (no gradient) and weight w of node t + 1.

    u = d * scale with scale = (bins - 1) / R; t = min(floor(u), bins - 2); w = u - t.
    """
    u = d * scale
    t = torch.floor(u.detach()).clamp(0, bins - 2)
    return t.long(), u - t


def distribution_loss(features: Tensor, partners: Tensor, bins: int) -> Tensor:
    """Section 3, Eq. 12-14: per attribute sum_t h+_t * sum_{k<=t} h-_k, averaged over attributes with both pair kinds."""
    d = pair_distances(features, partners)
    num_attributes = d.shape[1]
    k = partners.shape[-1] // 2
    is_pair = partners >= 0
    is_neg = torch.zeros_like(is_pair)
    is_neg[..., k:] = True
    n_pos = is_pair[..., :k].sum((0, 2))  # [A]
    n_neg = is_pair[..., k:].sum((0, 2))
    longest = torch.where(is_pair, d.detach(), 0.0).amax(dim=(0, 2))  # R per attribute, no gradient
    scale = torch.where(longest > 0, (bins - 1) / longest, 0.0)  # all-zero distances sit on node 0
    node, weight = histogram_nodes(d, scale[None, :, None], bins)
    attribute = torch.arange(num_attributes, device=d.device)[None, :, None]
    flat = ((attribute * 2 + is_neg.long()) * bins + node).flatten()
    weight = torch.where(is_pair, weight, 0.0).flatten()
    lower = torch.where(is_pair.flatten(), 1.0 - weight, 0.0)
    hist = torch.zeros(num_attributes * 2 * bins, dtype=d.dtype, device=d.device)
    hist = hist.index_add(0, flat, lower).index_add(0, flat + 1, weight).view(num_attributes, 2, bins)
    h_pos = hist[:, 0] / n_pos.clamp_min(1)[:, None]
    h_neg = hist[:, 1] / n_neg.clamp_min(1)[:, None]
    per_attribute = (h_pos * h_neg.cumsum(-1)).sum(-1)
    counted = (n_pos > 0) & (n_neg > 0)
    return torch.where(counted, per_attribute, 0.0).sum() / counted.sum().clamp_min(1)
