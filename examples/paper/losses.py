"""The imbalance methods a user would pick instead of CRL, for multi-attribute labels.

Every loss takes the logits and labels in crl_ops' formats (labels [B, A], -1 = not annotated;
logits a list of A tensors [B, C_j], [B, A, C], or [B, A] binary logits meaning [0, z]) and
follows crl_ops.cross_entropy's convention: per-entry losses summed over the annotated entries
and divided by the batch size, unless a class weight table turns it into a weighted mean per
attribute (crl_ops.balancing.weighted_cross_entropy's convention). Class statistics are per
attribute, from the training labels.

- `logit_adjusted_cross_entropy` (Menon et al., ICLR 2021, the logit-adjusted loss): CE on
  `z + tau * log prior`; with tau = 1 it is the balanced softmax (Ren et al., NeurIPS 2020).
  Predictions use the raw logits.
- `focal_loss` (Lin et al., ICCV 2017): `-(1 - p)^gamma * log p`; gamma = 0 is CE.
- `effective_number_weights` (Cui et al., CVPR 2019): class weights `(1 - beta) / (1 - beta^n_c)`,
  normalised to average 1 over an attribute's classes.
- `ldam_margins`, `margin_adjusted_logits` (Cao et al., NeurIPS 2019, LDAM): the label's logit is
  lowered by `scale * Delta_c`, `Delta_c` proportional to `n_c^(-1/4)` and `max_margin` for the
  rarest class; with the deferred re-weighting schedule (DRW) the loss switches to effective-number
  class weights for the last part of training.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

import crl_ops


def class_logits(logits, num_classes: Sequence[int]) -> List[Tensor]:
    """Any of crl_ops' logits formats as a list of A tensors [B, C_j] (binary z becomes [0, z])."""
    num_classes = tuple(num_classes)
    if isinstance(logits, (list, tuple)):
        return list(logits)
    if logits.dim() == 3:
        return [logits[:, j, :c] for j, c in enumerate(num_classes)]
    if logits.dim() == 2 and len(num_classes) == 1 and logits.shape[1] == num_classes[0] >= 2:
        return [logits]
    if logits.dim() == 2 and logits.shape[1] == len(num_classes) and set(num_classes) == {2}:
        return [torch.stack([torch.zeros_like(z), z], 1) for z in logits.unbind(1)]
    raise ValueError(f"logits of shape {list(logits.shape)} do not match num_classes {num_classes}")


def training_counts(train_labels: Tensor, num_classes: Sequence[int]) -> Tensor:
    """float64 [A, max C_j]: annotated training samples per class (crl_ops.class_counts)."""
    return crl_ops.class_counts(train_labels, tuple(num_classes)).double()


def log_priors(counts: Tensor) -> Tensor:
    """float64 [A, Cmax]: log(n_c / n_j); a class without training samples counts as one."""
    return torch.log(counts.clamp_min(1) / counts.sum(1, keepdim=True).clamp_min(1))


def logit_adjusted_cross_entropy(logits, labels: Tensor, num_classes: Sequence[int], log_prior: Tensor,
                                 tau: float = 1.0) -> Tensor:
    """crl_ops.cross_entropy of the logits plus `tau * log_prior[j, c]` (log_prior from `log_priors`)."""
    shifted = [lg + tau * log_prior[j, :lg.shape[1]].to(lg) for j, lg in enumerate(class_logits(logits, num_classes))]
    return crl_ops.cross_entropy(shifted, labels)


def focal_loss(logits, labels: Tensor, num_classes: Sequence[int], gamma: float = 2.0) -> Tensor:
    """-(1/B) sum over annotated entries of (1 - p)^gamma * log p, p the label's softmax probability."""
    labels = labels.reshape(labels.shape[0], -1)
    total = 0.0
    for j, lg in enumerate(class_logits(logits, num_classes)):
        annotated = labels[:, j] >= 0
        log_p = torch.log_softmax(lg.float(), 1).gather(1, labels[:, j].clamp_min(0)[:, None]).squeeze(1)
        per_entry = -(1 - log_p.exp()).pow(gamma) * log_p
        total = total + torch.where(annotated, per_entry, 0.0).sum()
    return total / labels.shape[0]


def effective_number_weights(counts: Tensor, beta: float = 0.9999) -> Tensor:
    """float64 [A, Cmax]: (1 - beta) / (1 - beta^n_c) for classes with samples, scaled to average 1
    over those classes of the attribute; 0 for classes without samples (and padding)."""
    present = counts > 0
    raw = torch.where(present, (1 - beta) / (1 - torch.pow(beta, counts.clamp_min(1))), 0.0)
    return raw * present.sum(1, keepdim=True) / raw.sum(1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)


def ldam_margins(counts: Tensor, max_margin: float = 0.5) -> Tensor:
    """float64 [A, Cmax]: Delta_c = n_c^(-1/4), scaled so that the attribute's rarest class gets
    `max_margin`; classes without samples (and padding) get the rarest class's margin."""
    present = counts > 0
    raw = counts.clamp_min(1).pow(-0.25)
    largest = torch.where(present, raw, 0.0).amax(1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)
    return torch.where(present, raw / largest, 1.0) * max_margin


def margin_adjusted_logits(logits, labels: Tensor, num_classes: Sequence[int], margins: Tensor) -> List[Tensor]:
    """The logits as a list [B, C_j], each annotated entry's label logit lowered by margins[j, label]."""
    labels = labels.reshape(labels.shape[0], -1)
    adjusted = []
    for j, lg in enumerate(class_logits(logits, num_classes)):
        label = labels[:, j].clamp_min(0)
        lowered = margins[j].to(lg)[label] * (labels[:, j] >= 0)
        adjusted.append(lg - torch.nn.functional.one_hot(label, lg.shape[1]).to(lg) * lowered[:, None])
    return adjusted


