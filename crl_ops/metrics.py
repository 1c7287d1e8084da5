"""Class-balanced accuracy (semantics section 5): per attribute, the mean per-class recall.

Also the class counts and imbalance ratios of a label set (the paper's "1:x" per attribute).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from . import reference
from ._inputs import check_tensor, normalise_labels, num_classes_tensor


class BalancedAccuracy(NamedTuple):
    per_attribute: Tensor  # [A] float64; NaN for an attribute with no annotated sample
    mean: Tensor  # scalar float64: mean over attributes with annotated samples


def class_balanced_accuracy(preds: Tensor, labels: Tensor,
                            num_classes: Union[int, Sequence[int]]) -> BalancedAccuracy:
    """The class-balanced accuracy of semantics section 5.

    Args:
        preds: integer predictions of exactly the shape of `labels`.
        labels: integer [B, A] (or [B] for one attribute); -1 = not annotated.
        num_classes: C_j: one int for every attribute, or one per attribute.

    Returns:
        `BalancedAccuracy(per_attribute [A] float64, mean)`: per attribute the mean over the classes
        present in `labels` of the recall of `preds` (NaN where nothing is annotated), and the mean
        over the attributes with annotated samples.

    Raises:
        TypeError, ValueError: a bad argument, preds of another shape, or a label outside -1..C_j-1.
    """
    labels_shape = tuple(labels.shape) if isinstance(labels, Tensor) else None
    labels, num_classes = _checked_labels(labels, num_classes)
    preds = check_tensor("preds", preds, floating=False)
    if tuple(preds.shape) != labels_shape:
        raise ValueError(f"preds must have the shape of labels {list(labels_shape)}, got {list(preds.shape)}")
    if preds.device != labels.device:
        raise ValueError(f"preds and labels must be on one device, got {preds.device} and {labels.device}")
    preds = preds.long().reshape(labels.shape)
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


def _checked_labels(labels, num_classes) -> tuple[Tensor, tuple]:
    labels, num_classes = normalise_labels(labels, num_classes)
    reference.check_labels(labels, num_classes_tensor(num_classes, labels.device), validate=True)
    return labels, num_classes


def class_counts(labels: Tensor, num_classes: Union[int, Sequence[int]]) -> Tensor:
    """Annotated samples per class (semantics section 1's h_c, over a whole label set).

    Args:
        labels: integer [N, A] or [N]; -1 = not annotated (not counted).
        num_classes: C_j: one int for every attribute, or one per attribute.

    Returns:
        int64 [A, max C_j].

    Raises:
        TypeError, ValueError: a bad argument, or a label outside -1..C_j-1.
    """
    labels, num_classes = _checked_labels(labels, num_classes)
    counts = torch.zeros(labels.shape[1], max(num_classes), dtype=torch.int64, device=labels.device)
    return counts.scatter_add_(1, labels.clamp_min(0).t(), (labels >= 0).t().long())


def imbalance_ratios(labels: Tensor, num_classes: Union[int, Sequence[int]]) -> Tensor:
    """Per attribute, the largest class count over the smallest (the paper's "1:x" is x).

    Args:
        labels, num_classes: as for `class_counts`.

    Returns:
        float64 [A]; only classes with at least one annotated sample count (an absent class has no
        ratio); NaN for an attribute with no annotated sample.

    Raises:
        TypeError, ValueError: as for `class_counts`.
    """
    counts = class_counts(labels, num_classes).double()
    smallest = torch.where(counts > 0, counts, torch.inf).amin(1)
    return torch.where(counts.amax(1) > 0, counts.amax(1) / smallest, torch.nan)


def imbalance_measure(labels: Tensor, num_classes: Union[int, Sequence[int]]) -> Tensor:
    """Omega_imb per attribute: the smallest fraction of the annotated samples that would have to
    change class for the class distribution to become uniform (semantics section 4).

    This is crl-ops' reading of the journal version's definition ("the minimum percentage count of
    data samples required over all classes to form a uniform class distribution"); the paper's
    formula could not be confirmed. It is the total-variation distance to the uniform
    distribution, sum_c max(0, n_c / N - 1 / C_j), between 0 (balanced) and 1 - 1 / C_j (one
    class only); classes absent from `labels` count as n_c = 0. Use it for the journal's
    alpha = eta * Omega_imb (`BalancedLoss(alpha=...)`), e.g. with its mean over attributes.

    Args:
        labels: integer [N, A] or [N] training labels; -1 = not annotated.
        num_classes: C_j: one int for every attribute, or one per attribute.

    Returns:
        float64 [A]; NaN for an attribute with no annotated sample.

    Raises:
        TypeError, ValueError: a bad argument, or a label outside -1..C_j-1.
    """
    labels, classes = _checked_labels(labels, num_classes)
    counts = class_counts(labels, classes).double()
    total = counts.sum(1, keepdim=True)
    real = torch.arange(counts.shape[1], device=counts.device) < torch.tensor(classes, device=counts.device)[:, None]
    uniform = 1.0 / torch.tensor(classes, dtype=torch.float64, device=counts.device)[:, None]
    excess = torch.where(real, (counts / total - uniform).clamp_min(0.0), 0.0).sum(1)
    return torch.where(total[:, 0] > 0, excess, torch.nan)
