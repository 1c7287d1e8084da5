"""Class-balanced accuracy (semantics section 5): per attribute, the mean per-class recall."""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from ._inputs import _check_tensor, normalise_labels


class BalancedAccuracy(NamedTuple):
    per_attribute: Tensor  # [A] float64; NaN for an attribute with no annotated sample
    mean: Tensor  # scalar float64: mean over attributes with annotated samples


def class_balanced_accuracy(preds: Tensor, labels: Tensor,
                            num_classes: Union[int, Sequence[int]]) -> BalancedAccuracy:
    """Mean over the classes present in `labels` of the recall of `preds`, per attribute.

    preds and labels: integer [B, A] (or [B] for one attribute); labels -1 = not annotated.
    """
    labels, num_classes = normalise_labels(labels, num_classes)
    preds = _check_tensor("preds", preds, floating=False)
    preds = preds.long().reshape(labels.shape) if preds.numel() == labels.numel() else None
    if preds is None:
        raise ValueError(f"preds must have the shape of labels {list(labels.shape)}")
    valid = labels >= 0
    width = max(num_classes)
    index = labels.clamp_min(0).t()
    support = torch.zeros(labels.shape[1], width, dtype=torch.float64, device=labels.device)
    support.scatter_add_(1, index, valid.t().double())
    hits = torch.zeros_like(support).scatter_add_(1, index, (valid & (preds == labels)).t().double())
    present = support > 0
    recall = torch.where(present, hits / support.clamp_min(1), 0.0)
    per_attribute = recall.sum(1) / present.sum(1)  # NaN (0/0) where nothing is annotated
    annotated = present.any(1)
    mean = torch.where(annotated, per_attribute, 0.0).sum() / annotated.sum()
    return BalancedAccuracy(per_attribute, mean)
