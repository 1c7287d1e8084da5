"""The public CRL API: `CRL`, `BalancedLoss`, `mine`, `profile_minority`, `cross_entropy`.

One pipeline serves every backend: normalise the inputs, profile the batch, mine, then apply the
chosen loss form to the mined pairs (measuring their distances inside it). The backend (native
kernels or the reference) supplies those steps; everything else lives here once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _backends
from ._inputs import (
    Batch,
    LogitsLike,
    accumulation_dtype,
    check_k,
    check_mode_form,
    check_values,
    normalise,
    normalise_labels,
    num_classes_tensor,
)
from .distributed import gather_batch

MarginLike = Union[None, float, Sequence[float], Tensor]


class Mined(NamedTuple):
    """Fixed-shape mining result (semantics section 2); -1 marks an empty slot."""

    anchors: Tensor  # [B, A] bool
    positives: Tensor  # [B, A, K] int64
    negatives: Tensor  # [B, A, K] int64


@dataclass(frozen=True)
class BatchStats:
    """What CRL saw in one batch, per attribute (tensors on the batch's device; no host sync until read)."""

    counts: Tensor  # [A, Cmax] valid samples per class
    minority: Tensor  # [A, Cmax] minority classes (section 1), padding classes excluded
    active: Tensor  # [A, Cmax] minority classes with at least two samples
    num_anchors: Tensor  # [A]
    num_positive_pairs: Tensor  # [A]
    num_negative_pairs: Tensor  # [A]
    num_triplets: Tensor  # [A]

    def summary(self) -> dict:
        """Plain Python numbers for a logger (one host synchronisation)."""
        return {
            "minority_classes": [row.nonzero().flatten().tolist() for row in self.minority.cpu()],
            "anchors": int(self.num_anchors.sum()),
            "positive_pairs": int(self.num_positive_pairs.sum()),
            "negative_pairs": int(self.num_negative_pairs.sum()),
            "triplets": int(self.num_triplets.sum()),
        }


@dataclass(frozen=True)
class _MiningRecord:
    """Kept by a module after each forward; turned into BatchStats only when asked for."""

    counts: Tensor
    minority: Tensor
    active: Tensor
    anchors: Tensor
    partners: Tensor
    num_classes: tuple

    def stats(self) -> BatchStats:
        k = self.partners.shape[-1] // 2
        has_pos = (self.partners[..., :k] >= 0).sum(-1)  # [B, A]
        has_neg = (self.partners[..., k:] >= 0).sum(-1)
        classes = torch.arange(self.counts.shape[1], device=self.counts.device)
        real = classes[None, :] < num_classes_tensor(self.num_classes, self.counts.device)[:, None]
        return BatchStats(
            counts=self.counts,
            minority=self.minority & real,
            active=self.active,
            num_anchors=self.anchors.sum(0),
            num_positive_pairs=has_pos.sum(0),
            num_negative_pairs=has_neg.sum(0),
            num_triplets=(has_pos * has_neg).sum(0),
        )


# ---- argument checks ----------------------------------------------------------------------------


def _check_float(name: str, value, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" and >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be finite{bound}, got {value}")
    return value


def _check_margin(margin: MarginLike) -> MarginLike:
    if margin is None or isinstance(margin, Tensor):
        return margin
    if isinstance(margin, (int, float)) and not isinstance(margin, bool):
        return _check_float("margin", margin)
    if isinstance(margin, Sequence):
        return tuple(_check_float(f"margin[{j}]", m) for j, m in enumerate(margin))
    raise TypeError(f"margin must be None, a float or one float per attribute, got {type(margin).__name__}")


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def _check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError(f"bins must be an int, got {type(bins).__name__}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    return bins


_MARGIN_CACHE: dict = {}


def _margins(margin: MarginLike, num_classes: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-attribute triplet margins m_j: 2*pi/C_j by default (paper Eq. 10)."""
    num_attributes = len(num_classes)
    if isinstance(margin, Tensor):
        if margin.shape not in ((num_attributes,), ()):
            raise ValueError(f"margin tensor must have shape [A={num_attributes}] or [], got {list(margin.shape)}")
        return margin.to(device=device, dtype=dtype).expand(num_attributes)
    if margin is None:
        values = tuple(2 * math.pi / c for c in num_classes)
    elif isinstance(margin, float):
        values = (margin,) * num_attributes
    else:
        if len(margin) != num_attributes:
            raise ValueError(f"margin has {len(margin)} values but the batch has A={num_attributes} attributes")
        values = tuple(margin)
    if torch.compiler.is_compiling():
        # A constant of the graph; a lookup in the cache would guard on its contents and recompile.
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, device)
    if key not in _MARGIN_CACHE:
        _MARGIN_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return _MARGIN_CACHE[key]


# ---- the pipeline ---------------------------------------------------------------------------------


def _mine_batch(batch: Batch, mode: str, k: int, backend):
    counts, minority, active = backend.profile(batch.labels, batch.max_classes)
    logits = batch.logits.detach()
    if mode == "class":
        scores = torch.softmax(logits, dim=-1, dtype=accumulation_dtype(logits.dtype))
        anchors, partners = backend.mine_class(scores, batch.labels, active, k)
    else:
        anchors, partners = backend.mine_instance(batch.features, logits.argmax(-1), batch.labels, active, k)
    record = _MiningRecord(counts, minority, active, anchors, partners, batch.num_classes)
    return record


def _crl_from_batch(batch: Batch, mode, form, k, margin, apc_margin, bins, backend_name):
    backend = _backends.resolve(backend_name, batch.features.device)
    record = _mine_batch(batch, mode, k, backend)
    features, partners = batch.features, record.partners
    if form == "relative":
        margins = _margins(margin, batch.num_classes, accumulation_dtype(features.dtype), features.device)
        loss = backend.relative_loss(features, partners, margins)
    elif form == "absolute":
        loss = backend.absolute_loss(features, partners, apc_margin)
    else:
        loss = backend.distribution_loss(features, partners, bins)
    return loss, record


def cross_entropy(logits: LogitsLike, labels: Tensor) -> Tensor:
    """Section 4: -(1/B) sum_i sum_{j annotated} log p_i(label_ij), in float32 or better.

    Takes the logits and labels in any of CRL's input formats.
    """
    return _cross_entropy(normalise(None, logits, labels))


def _cross_entropy(batch: Batch) -> Tensor:
    logits = batch.logits
    log_p = torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)), dim=-1)
    picked = log_p.gather(-1, batch.labels.clamp_min(0)[..., None]).squeeze(-1)
    return -torch.where(batch.labels >= 0, picked, 0.0).sum() / batch.labels.shape[0]


def profile_minority(labels: Tensor, num_classes: Union[int, Sequence[int]], backend: str = "auto"):
    """Section 1: (counts [A, Cmax] int64, active [A, Cmax] bool) of a label batch [B, A] or [B]."""
    _backends.check_backend(backend)
    labels, num_classes = normalise_labels(labels, num_classes)
    counts, _, active = _backends.resolve(backend, labels.device).profile(labels, max(num_classes))
    return counts, active


def mine(features: Tensor, logits: LogitsLike, labels: Tensor, mode: str = "instance", k: int = 5,
         backend: str = "auto") -> Mined:
    """Section 2: the hard positives and negatives of every minority-class anchor."""
    check_mode_form(mode)
    check_k(k)
    _backends.check_backend(backend)
    batch = normalise(features, logits, labels)
    record = _mine_batch(batch, mode, k, _backends.resolve(backend, batch.features.device))
    return Mined(record.anchors, record.partners[..., :k], record.partners[..., k:])


class CRL(nn.Module):
    """Class Rectification Loss l_crl (Dong, Gong, Zhu, ICCV 2017) with the semantics of docs/semantics.md.

    `forward(features, logits, labels)` returns the scalar l_crl; add it to your cross-entropy
    (or use `BalancedLoss`). After each forward, `last_stats` describes what was mined.
    `validate=False` skips the value checks (label range, finite inputs) and their host
    synchronisation; they are skipped anyway while torch.compile traces.
    `distributed=True` profiles and mines over the global batch of the default process group
    (see `crl_ops.distributed`): every rank gets the loss of all ranks' samples together.
    """

    def __init__(self, mode: str = "instance", form: str = "relative", k: int = 5, margin: MarginLike = None,
                 apc_margin: float = 1.0, bins: int = 100, backend: str = "auto", validate: bool = True,
                 distributed: bool = False):
        super().__init__()
        check_mode_form(mode, form)
        self.mode = mode
        self.form = form
        self.k = check_k(k)
        self.margin = _check_margin(margin)
        self.apc_margin = _check_float("apc_margin", apc_margin, minimum=0.0)
        self.bins = _check_bins(bins)
        self.backend = _backends.check_backend(backend)
        self.validate = bool(validate)
        self.distributed = _check_bool("distributed", distributed)
        self._last: Optional[_MiningRecord] = None

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, form={self.form!r}, k={self.k}, backend={self.backend!r}"
                f"{', distributed=True' if self.distributed else ''}")

    def prepare_batch(self, features: Tensor, logits: LogitsLike, labels: Tensor) -> Batch:
        """The normalised batch: this process's, or with distributed=True all ranks' together."""
        if not self.distributed:
            return normalise(features, logits, labels, self.validate)
        batch = gather_batch(normalise(features, logits, labels, validate=False))
        if self.validate:
            check_values(batch)  # on the global batch, so that every rank raises the same error
        return batch

    def forward_batch(self, batch: Batch) -> Tensor:
        loss, self._last = _crl_from_batch(
            batch, self.mode, self.form, self.k, self.margin, self.apc_margin, self.bins, self.backend
        )
        return loss

    def forward(self, features: Tensor, logits: LogitsLike, labels: Tensor) -> Tensor:
        return self.forward_batch(self.prepare_batch(features, logits, labels))

    @property
    def last_stats(self) -> Optional[BatchStats]:
        """Statistics of the last batch (None before the first forward)."""
        return None if self._last is None else self._last.stats()


class BalancedLoss(nn.Module):
    """l_bln = l_ce + weight * l_crl (paper Eq. 8, semantics section 4).

    With `distributed=True` both terms are those of the global batch (all ranks' samples).
    """

    def __init__(self, mode: str = "instance", form: str = "relative", weight: float = 1.0, *,
                 distributed: bool = False, **crl_kwargs):
        super().__init__()
        self.weight = _check_float("weight", weight)
        self.crl = CRL(mode=mode, form=form, distributed=distributed, **crl_kwargs)
        self.last_ce: Optional[Tensor] = None
        self.last_crl: Optional[Tensor] = None

    def forward(self, features: Tensor, logits: LogitsLike, labels: Tensor) -> Tensor:
        batch = self.crl.prepare_batch(features, logits, labels)
        ce = _cross_entropy(batch)
        crl = self.crl.forward_batch(batch)
        self.last_ce, self.last_crl = ce.detach(), crl.detach()
        return ce + self.weight * crl

    @property
    def last_stats(self) -> Optional[BatchStats]:
        return self.crl.last_stats
