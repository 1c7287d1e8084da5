"""CRL stitched from pytorch-metric-learning (PML) building blocks on crl-ops' mined indices.

PML has no miner for CRL's per-batch minority classes, so mining is `crl_ops.mine` (native kernels
where built). What PML computes, per attribute (one call each: PML losses take one [N, D]
embedding matrix and one margin):

- relative: `TripletMarginLoss(margin=2*pi/C_j)` with `LpDistance(normalize_embeddings=False)`
  on the mined (anchor, positive, negative) triplets. PML's default `AvgNonZeroReducer` averages
  over the non-zero triplets of one call; CRL averages over all triplets of all attributes, so
  the per-triplet losses are taken with `DoNothingReducer` and pooled here.
- absolute: `ContrastiveLoss(pos_margin=0, neg_margin=apc_margin)` with the same distance on the
  mined positive and negative pairs. PML's hinges are not squared (Eq. 11 squares them), so the
  squaring and the pooled means are done here on its per-pair losses.
- distribution: `HistogramLoss(n_bins=bins - 1)` fed the similarity `1 - 2 d / R`, which puts
  CRL's `bins` nodes on [0, R] onto PML's nodes on [-1, 1]. PML builds its pairs from triplets and
  keeps each unordered pair once, whereas CRL counts every (anchor, mined sample) pair, so the
  values usually differ (the benchmark reports by how much and does not time it then).

Every call computes a full [B, B] distance matrix for the attribute, as PML does.
"""
from __future__ import annotations

import math
import warnings

import torch
from pytorch_metric_learning import distances, losses, reducers
from torch import Tensor

import crl_ops


class _RescaledDistanceSimilarity(distances.BaseDistance):
    """1 - 2 d / R: a similarity in [-1, 1] for PML's histogram loss, R set before each call."""

    def __init__(self):
        super().__init__(normalize_embeddings=False, is_inverted=True)
        self.longest = 1.0

    def compute_mat(self, query_emb, ref_emb):
        # Rounding may put the longest pair just past R, and PML's bin index would go negative.
        return (1 - 2 * torch.cdist(query_emb, ref_emb) / self.longest).clamp_min(-1.0)


class PMLCRL:
    """l_crl(features [B, A, D], logits, labels [B, A]) with PML's losses on crl-ops' mining."""

    def __init__(self, mode: str = "instance", form: str = "relative", k: int = 5, apc_margin: float = 1.0,
                 bins: int = 100):
        self.mode, self.form, self.k, self.apc_margin = mode, form, k, apc_margin
        self._distance = distances.LpDistance(normalize_embeddings=False)
        self._triplet_losses = {}  # PML takes one margin per loss object: one object per margin
        self._contrastive = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=apc_margin, distance=self._distance,
                                                   reducer=reducers.DoNothingReducer())
        self._similarity = _RescaledDistanceSimilarity()
        self._histogram = losses.HistogramLoss(n_bins=bins - 1, distance=self._similarity)

    def __call__(self, features: Tensor, logits, labels: Tensor) -> Tensor:
        mined = crl_ops.mine(features.detach(), logits, labels, self.mode, self.k)
        num_classes = [2] * labels.shape[1] if _binary(logits, labels) else _widths(logits)
        if self.form == "relative":
            return self._relative(features, mined, num_classes)
        if self.form == "absolute":
            return self._absolute(features, mined)
        return self._distribution(features, mined)

    def _relative(self, features, mined, num_classes) -> Tensor:
        total, count = features.sum() * 0.0, 0
        for j, classes in enumerate(num_classes):
            positives, negatives = mined.positives[:, j], mined.negatives[:, j]
            is_triplet = (positives >= 0)[:, :, None] & (negatives >= 0)[:, None, :]
            anchor, p_slot, n_slot = is_triplet.nonzero(as_tuple=True)
            if len(anchor) == 0:
                continue
            triplets = (anchor, positives[anchor, p_slot], negatives[anchor, n_slot])
            triplet_loss = self._triplet_loss(2 * math.pi / classes)
            per_triplet = triplet_loss(features[:, j], indices_tuple=triplets)["loss"]["losses"]
            total = total + per_triplet.sum()
            count += len(anchor)
        return total / max(count, 1)

    def _triplet_loss(self, margin: float):
        if margin not in self._triplet_losses:
            self._triplet_losses[margin] = losses.TripletMarginLoss(
                margin=margin, distance=self._distance, reducer=reducers.DoNothingReducer())
        return self._triplet_losses[margin]

    def _absolute(self, features, mined) -> Tensor:
        sums, counts = [features.sum() * 0.0, features.sum() * 0.0], [0, 0]
        for j in range(mined.anchors.shape[1]):
            pairs = [_pairs(mined.positives[:, j]), _pairs(mined.negatives[:, j])]
            if not len(pairs[0][0]) and not len(pairs[1][0]):
                continue
            result = self._contrastive(features[:, j], indices_tuple=(*pairs[0], *pairs[1]))
            for side, name in enumerate(("pos_loss", "neg_loss")):
                per_pair = result[name]["losses"]
                if torch.is_tensor(per_pair):  # PML gives a plain 0 for an empty side
                    sums[side] = sums[side] + per_pair.square().sum()
                    counts[side] += len(per_pair)
        return 0.5 * (sums[0] / max(counts[0], 1) + sums[1] / max(counts[1], 1))

    def _distribution(self, features, mined) -> Tensor:
        per_attribute = []
        for j in range(mined.anchors.shape[1]):
            positives, negatives = mined.positives[:, j], mined.negatives[:, j]
            is_triplet = (positives >= 0)[:, :, None] & (negatives >= 0)[:, None, :]
            anchor, p_slot, n_slot = is_triplet.nonzero(as_tuple=True)
            if len(anchor) == 0:
                continue
            x = features[:, j]
            with torch.no_grad():  # R: the longest mined pair distance, no gradient (as CRL)
                partners = torch.cat([positives, negatives], 1)
                a, slot = (partners >= 0).nonzero(as_tuple=True)
                self._similarity.longest = float((x[a] - x[partners[a, slot]]).norm(dim=-1).max())
            triplets = (anchor, positives[anchor, p_slot], negatives[anchor, n_slot])
            with warnings.catch_warnings():  # PML 2.9 indexes with a list of lists, which torch deprecates
                warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
                per_attribute.append(self._histogram(x, indices_tuple=triplets))
        if not per_attribute:
            return features.sum() * 0.0
        return torch.stack(per_attribute).mean()


def _pairs(partners: Tensor) -> tuple:
    """(anchor, partner) index tensors of the filled slots of partners [B, K]."""
    anchor, slot = (partners >= 0).nonzero(as_tuple=True)
    return anchor, partners[anchor, slot]


def _binary(logits, labels) -> bool:
    return torch.is_tensor(logits) and logits.dim() == 2 and logits.shape[1] == labels.shape[1]


def _widths(logits) -> list:
    return [lj.shape[-1] for lj in logits] if isinstance(logits, (list, tuple)) else [logits.shape[-1]] * logits.shape[1]
