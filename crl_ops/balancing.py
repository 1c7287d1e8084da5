"""The paper's classical imbalanced-learning baselines, for multi-attribute labels (semantics
section 7): class weights, cost-sensitive cross-entropy, over- and down-sampling.

All three rest on one table, the per-attribute class balancing weights
`w[j, c] = n_j / (K_j * h_jc)` (`n_j` annotated samples of attribute j, `K_j` classes present,
`h_jc` samples of class c): weighting every sample by the weight of its class makes the classes
of an attribute equally heavy, and the weights of an attribute average 1 over its samples.

- Cost-sensitive learning: `weighted_cross_entropy`, per attribute the weighted mean of the
  entries' `-log p(label)` with weights `w[j, label]`, summed over attributes (the convention of
  `torch.nn.functional.cross_entropy(weight=...)`; with unit weights and every entry annotated it
  is semantics section 4's cross-entropy). Dividing by the batch's weights rather than by the
  batch size keeps the loss on CE's scale when a class 4,000 times rarer shows up (weight ~1,000).
- Over-sampling and down-sampling: a sample has many attributes, so it is drawn according to its
  rarest value, `sample_weight_i = max_j w[j, label_ij]` (`sample_weights`). `OverSampler`
  draws an epoch of N samples with replacement in proportion to it; `DownSampler` keeps each
  sample with probability `sample_weight_i / max sample_weight`, a fresh subset every epoch.
  With one attribute both balance its classes exactly (in expectation).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Sampler

from . import reference
from ._inputs import LogitsLike, normalise
from .metrics import class_counts

NumClasses = Union[int, Sequence[int]]


def balancing_weights(labels: Tensor, num_classes: NumClasses) -> Tensor:
    """The per-attribute class balancing weights of semantics section 7.

    Args:
        labels: integer [N, A] or [N] training labels; -1 = not annotated.
        num_classes: C_j: one int for every attribute, or one per attribute.

    Returns:
        float64 [A, max C_j]: `n_j / (K_j * h_jc)` for each class present in `labels`, 0 otherwise.

    Raises:
        TypeError, ValueError: a bad argument, or a label outside -1..C_j-1.
    """
    counts = class_counts(labels, num_classes).double()
    present = counts > 0
    annotated = counts.sum(1, keepdim=True)
    classes_present = present.sum(1, keepdim=True).clamp_min(1)
    return torch.where(present, annotated / (classes_present * counts.clamp_min(1)), 0.0)


def sample_weights(labels: Tensor, num_classes: NumClasses) -> Tensor:
    """Per-sample weights for re-sampling (semantics section 7).

    Args:
        labels, num_classes: as for `balancing_weights`.

    Returns:
        float64 [N]: the balancing weight of each sample's rarest annotated value (0 if none is annotated).

    Raises:
        TypeError, ValueError: as for `balancing_weights`.
    """
    weights = balancing_weights(labels, num_classes)
    labels = labels.reshape(labels.shape[0], -1)
    per_entry = weights.t().gather(0, labels.clamp_min(0))  # [N, A]: w[j, label_ij]
    return torch.where(labels >= 0, per_entry, 0.0).amax(1)


def weighted_cross_entropy(logits: LogitsLike, labels: Tensor, class_weights: Tensor) -> Tensor:
    """Cost-sensitive cross-entropy (semantics section 7).

    Args:
        logits, labels: in any of `crl_ops.cross_entropy`'s formats.
        class_weights: `[A, >= max C_j]`, e.g. `balancing_weights` of the training labels.

    Returns:
        `sum_j (sum_i w_ij * -log p_i(label_ij)) / (sum_i w_ij)` over annotated entries, with
        `w_ij = class_weights[j, label_ij]`, in float32 (float64 for float64 logits). An attribute
        without annotated entries (or whose entries all weigh 0) adds 0.

    Raises:
        TypeError, ValueError: a bad argument, or a label outside -1..C_j-1.
    """
    batch = normalise(None, logits, labels, with_features=False)
    num_attributes, width = batch.labels.shape[1], batch.max_classes
    if not isinstance(class_weights, Tensor) or class_weights.dim() != 2 \
            or class_weights.shape[0] != num_attributes or class_weights.shape[1] < width:
        shape = list(class_weights.shape) if isinstance(class_weights, Tensor) else type(class_weights).__name__
        raise ValueError(f"class_weights must be a tensor [A={num_attributes}, >= {width}], got {shape}")
    num_classes = batch.classes_tensor()
    log_p = torch.log_softmax(reference.class_logits(batch.logits, num_classes), dim=-1)
    annotated = reference.is_annotated(reference.check_labels(batch.labels, num_classes, True), num_classes)
    index = torch.where(annotated, batch.labels, 0)
    picked = log_p.gather(-1, index[..., None]).squeeze(-1)
    dtype = log_p.dtype
    weight = class_weights.to(device=log_p.device, dtype=dtype).gather(1, index.t()).t()  # [B, A]
    weight = torch.where(annotated, weight, 0.0)
    per_attribute = -(weight * picked).sum(0) / weight.sum(0).clamp_min(torch.finfo(dtype).tiny)
    return per_attribute.sum()


def _check_weights(weights) -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.numel() == 0:
        raise ValueError("weights must be a non-empty 1-d tensor (one weight per sample, e.g. sample_weights)")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool((weights > 0).any()):
        raise ValueError("weights must be finite and >= 0, with at least one > 0")
    return weights.double().cpu()


class OverSampler(Sampler[int]):
    """Over-sampling (semantics section 7): each epoch, `num_samples` indices (default: one per
    sample) drawn with replacement in proportion to `weights`.

    Args:
        weights: float [N] >= 0 with at least one > 0, e.g. `sample_weights` of the training labels.
        num_samples: indices per epoch (default N).
        generator: the torch.Generator to draw with.

    Raises:
        ValueError: weights not a non-empty finite non-negative 1-d tensor, or num_samples < 1.
    """

    def __init__(self, weights: Tensor, num_samples: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        self.weights = _check_weights(weights)
        self.num_samples = len(self.weights) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.generator = generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        drawn = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self.generator)
        return iter(drawn.tolist())


class DownSampler(Sampler[int]):
    """Down-sampling (semantics section 7): each epoch a fresh random subset, sample i kept with
    probability `weights[i] / max(weights)`. Args and Raises as for `OverSampler` (no num_samples).

    Systematic sampling gives exactly these inclusion probabilities; running it over the samples
    sorted by weight (ties in random order) also keeps the number drawn from every group of equal
    weight (with one attribute: every class) within one of its expectation. The next epoch is drawn in advance, so that `len()`
    (read by DataLoader and tqdm before iterating) is the size of the epoch that follows.
    """

    def __init__(self, weights: Tensor, generator: Optional[torch.Generator] = None):
        weights = _check_weights(weights)
        self.keep_probability = weights / weights.max()
        self.generator = generator
        self._next = self._draw()

    def _draw(self) -> Tensor:
        shuffled = torch.randperm(len(self.keep_probability), generator=self.generator)
        order = shuffled[torch.sort(self.keep_probability[shuffled], stable=True).indices]
        offset = torch.rand((), generator=self.generator, dtype=torch.float64)
        edges = torch.floor(torch.cumsum(self.keep_probability[order], 0) + offset)
        crossed = torch.diff(edges, prepend=torch.floor(offset)[None]) > 0
        return order[crossed]

    def __len__(self) -> int:
        return len(self._next)

    def __iter__(self) -> Iterator[int]:
        epoch, self._next = self._next, self._draw()
        return iter(epoch.tolist())
