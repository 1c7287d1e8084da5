"""CRL as a user would write it from the paper: Python loops over attributes and minority classes.

Each step of the paper (batch profiling, hard mining, the loss) is done attribute by attribute and
class by class, vectorised only within one class. It computes the function of docs/semantics.md,
so the benchmark can check its loss against crl-ops before timing it; it is the "no library"
baseline. Top-k selection uses `torch.topk`, which breaks exact ties arbitrarily (random float
features have none).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _class_logits(logits, j: int) -> Tensor:
    """Attribute j's class logits [B, C_j] from a list, a [B, A, C] tensor or [B, A] binary logits."""
    if isinstance(logits, (list, tuple)):
        return logits[j]
    if logits.dim() == 3:
        return logits[:, j]
    z = logits[:, j]
    return torch.stack([torch.zeros_like(z), z], -1)  # one binary logit z means class logits [0, z]


def _active_minority_classes(labels_j: Tensor, num_classes: int) -> list:
    """Paper Eq. 3 and footnote 1: the smallest classes holding under half of the annotated samples, if 2+ samples."""
    counts = torch.bincount(labels_j[labels_j >= 0], minlength=num_classes).tolist()
    half = sum(counts) / 2
    active, total = [], 0
    for c in sorted(range(num_classes), key=lambda c: (counts[c], c)):
        total += counts[c]
        if total >= half:
            break
        if counts[c] >= 2:
            active.append(c)
    return active


def _take(keys: Tensor, candidates: Tensor, k: int, largest: bool) -> tuple:
    """Per row, the indices of the k best candidates and whether each slot holds one."""
    fill = -math.inf if largest else math.inf
    top = torch.topk(keys.masked_fill(~candidates, fill), min(k, keys.shape[-1]), dim=-1, largest=largest)
    return top.indices, candidates.gather(-1, top.indices)


class LoopCRL:
    """l_crl(features [B, A, D], logits, labels [B, A]) for one mining mode and loss form."""

    def __init__(self, mode: str = "instance", form: str = "relative", k: int = 5, apc_margin: float = 1.0,
                 bins: int = 100):
        self.mode, self.form, self.k = mode, form, k
        self.apc_margin, self.bins = apc_margin, bins

    def __call__(self, features: Tensor, logits, labels: Tensor) -> Tensor:
        sums = {"hinge": 0.0, "triplets": 0, "pos": 0.0, "pos_pairs": 0, "neg": 0.0, "neg_pairs": 0}
        histogram_losses = []
        for j in range(labels.shape[1]):
            x = features[:, j].float()
            labels_j = labels[:, j]
            class_logits = _class_logits(logits, j).detach().float()
            margin = 2 * math.pi / class_logits.shape[1]
            pos_distances, neg_distances = [], []
            for c in _active_minority_classes(labels_j, class_logits.shape[1]):
                anchors = (labels_j == c).nonzero().squeeze(1)
                if self.mode == "class":
                    positives, pos_valid, negatives, neg_valid = self._mine_class(class_logits, labels_j, anchors, c)
                else:
                    positives, pos_valid, negatives, neg_valid = self._mine_instance(
                        x.detach(), class_logits, labels_j, anchors, c)
                d_pos = (x[anchors][:, None] - x[positives]).norm(dim=-1)  # [anchors, K]
                d_neg = (x[anchors][:, None] - x[negatives]).norm(dim=-1)
                if self.form == "relative":
                    hinge = torch.relu(margin + d_pos[:, :, None] - d_neg[:, None, :])
                    is_triplet = pos_valid[:, :, None] & neg_valid[:, None, :]
                    sums["hinge"] = sums["hinge"] + torch.where(is_triplet, hinge, 0.0).sum()
                    sums["triplets"] += int(is_triplet.sum())
                elif self.form == "absolute":
                    sums["pos"] = sums["pos"] + torch.where(pos_valid, d_pos.square(), 0.0).sum()
                    sums["neg"] = sums["neg"] + torch.where(neg_valid, torch.relu(self.apc_margin - d_neg).square(),
                                                            0.0).sum()
                    sums["pos_pairs"] += int(pos_valid.sum())
                    sums["neg_pairs"] += int(neg_valid.sum())
                else:
                    pos_distances.append(d_pos[pos_valid])
                    neg_distances.append(d_neg[neg_valid])
            if self.form == "distribution" and pos_distances:
                d_pos, d_neg = torch.cat(pos_distances), torch.cat(neg_distances)
                if len(d_pos) and len(d_neg):
                    histogram_losses.append(self._histogram_loss(d_pos, d_neg))
        zero = features.sum() * 0.0  # keeps an empty loss in the graph
        if self.form == "relative":
            return zero + sums["hinge"] / max(sums["triplets"], 1)
        if self.form == "absolute":
            return zero + 0.5 * (sums["pos"] / max(sums["pos_pairs"], 1) + sums["neg"] / max(sums["neg_pairs"], 1))
        return zero + (sum(histogram_losses) / len(histogram_losses) if histogram_losses else 0.0)

    def _mine_class(self, class_logits, labels_j, anchors, c):
        """Paper Eq. 4-5: the K lowest-scored members of c, the K highest-scored annotated others."""
        score = torch.softmax(class_logits, -1)[:, c]
        members = labels_j == c
        others = (labels_j >= 0) & ~members
        hard_pos, pos_ok = _take(score, members, self.k, largest=False)
        hard_neg, neg_ok = _take(score, others, self.k, largest=True)
        hard_pos, hard_neg = hard_pos[pos_ok], hard_neg[neg_ok]
        positives = hard_pos.expand(len(anchors), -1)
        negatives = hard_neg.expand(len(anchors), -1)
        return positives, positives != anchors[:, None], negatives, torch.ones_like(negatives, dtype=torch.bool)

    def _mine_instance(self, x, class_logits, labels_j, anchors, c):
        """Paper Eq. 6-7: per anchor, the K farthest misclassified members of c, the K nearest annotated others."""
        distances = torch.cdist(x[anchors], x)  # [anchors, B]
        members = labels_j == c
        misclassified = class_logits.argmax(-1) != c
        not_self = torch.ones_like(distances, dtype=torch.bool)
        not_self[torch.arange(len(anchors), device=x.device), anchors] = False
        positives, pos_valid = _take(distances, (members & misclassified)[None, :] & not_self, self.k, largest=True)
        others = ((labels_j >= 0) & ~members)[None, :].expand_as(distances)
        negatives, neg_valid = _take(distances, others, self.k, largest=False)
        return positives, pos_valid, negatives, neg_valid

    def _histogram_loss(self, d_pos: Tensor, d_neg: Tensor) -> Tensor:
        """Paper Eq. 12-14 on [0, R] with `bins` nodes, R the largest pair distance (no gradient)."""
        longest = float(torch.cat([d_pos, d_neg]).detach().max())
        scale = (self.bins - 1) / longest if longest > 0 else 0.0

        def histogram(d):
            u = d * scale
            node = u.detach().floor().clamp(0, self.bins - 2).long()
            upper = u - node
            h = torch.zeros(self.bins, dtype=d.dtype, device=d.device)
            h = h.index_add(0, node, 1 - upper).index_add(0, node + 1, upper)
            return h / len(d)

        return (histogram(d_pos) * histogram(d_neg).cumsum(0)).sum()
