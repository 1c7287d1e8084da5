"""Input conventions: every accepted shape of (features, logits, labels) becomes one `Batch`.

The semantics page (docs/semantics.md) lists the accepted shapes. Everything downstream
(the reference, the native ops) sees only the normalised form:

- features  [B, A, D]   (a [B, D] input is expanded, not copied)
- logits    [B, A, Cmax] padded with -inf past each attribute's C_j
- labels    [B, A] int64, -1 = not annotated
- num_classes  (C_1, ..., C_A)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

LogitsLike = Union[Tensor, Sequence[Tensor]]

MODES = ("class", "instance")
FORMS = ("relative", "absolute", "distribution")


@dataclass(frozen=True)
class Batch:
    features: Tensor
    logits: Tensor
    labels: Tensor
    num_classes: tuple

    @property
    def max_classes(self) -> int:
        return self.logits.shape[-1]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half, bfloat16 and float32 inputs; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32  # torch.promote_types would dispatch an op


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, value, floating: bool) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if not floating and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(
            f"{name} must be an integer tensor (class indices, -1 = not annotated), got dtype {value.dtype}"
        )
    return value


def check_mode_form(mode: str, form: str | None = None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _normalise_labels(labels) -> Tensor:
    labels = _check_tensor("labels", labels, floating=False)
    if labels.dim() == 1:
        labels = labels[:, None]
    elif labels.dim() != 2:
        raise ValueError(f"labels must have shape [B, A] or [B], got {_shape(labels)}")
    return labels if labels.dtype == torch.long else labels.long()


def _pad_classes(logits: Tensor, dtype: torch.dtype, max_classes: int) -> Tensor:
    """[B, C_j] -> [B, Cmax] in `dtype`, padded with -inf (probability 0); no op where nothing changes."""
    if logits.dtype != dtype:
        logits = logits.to(dtype)
    if logits.shape[1] == max_classes:
        return logits
    return torch.nn.functional.pad(logits, (0, max_classes - logits.shape[1]), value=-math.inf)


def _normalise_logits(logits: LogitsLike, batch_size: int, num_attributes: int, labels_1d: bool):
    """Returns (padded logits [B, A, Cmax], num_classes)."""
    if isinstance(logits, (list, tuple)):
        if len(logits) != num_attributes:
            raise ValueError(
                f"logits is a list of {len(logits)} tensors but labels have {num_attributes} attributes; "
                "give one [B, C_j] tensor per attribute"
            )
        for j, lj in enumerate(logits):
            _check_tensor(f"logits[{j}]", lj, floating=True)
            if lj.dim() != 2 or lj.shape[0] != batch_size or lj.shape[1] < 2:
                raise ValueError(
                    f"logits[{j}] must have shape [B={batch_size}, C_j >= 2], got {_shape(lj)}"
                )
        devices = {lj.device for lj in logits}
        if len(devices) > 1:
            raise ValueError(f"all logits must be on one device, got {sorted(map(str, devices))}")
        dtype = logits[0].dtype
        for lj in logits[1:]:
            if lj.dtype != dtype:  # each call of torch.promote_types is a dispatched op
                dtype = torch.promote_types(dtype, lj.dtype)
        num_classes = tuple(int(lj.shape[1]) for lj in logits)
        cmax = max(num_classes)
        padded = torch.stack([_pad_classes(lj, dtype, cmax) for lj in logits], dim=1)
        return padded, num_classes

    logits = _check_tensor("logits", logits, floating=True)
    if logits.shape[:1] != (batch_size,):
        raise ValueError(f"logits must have batch size B={batch_size} in dim 0, got {_shape(logits)}")
    if logits.dim() == 3:
        if logits.shape[1] != num_attributes or logits.shape[2] < 2:
            raise ValueError(
                f"logits [B, A, C] must have A={num_attributes} (from labels) and C >= 2, got {_shape(logits)}"
            )
        return logits, (int(logits.shape[2]),) * num_attributes
    if logits.dim() == 2:
        width = logits.shape[1]
        if not labels_1d and width == num_attributes:
            # [B, A]: one logit z per binary attribute, meaning the class logits [0, z].
            padded = torch.stack([torch.zeros_like(logits), logits], dim=-1)
            return padded, (2,) * num_attributes
        if num_attributes == 1 and width >= 2:
            return logits[:, None, :], (int(width),)
        raise ValueError(
            f"logits of shape {_shape(logits)} do not match labels with A={num_attributes} attributes: "
            "expected [B, A] (one logit per binary attribute) or, for a single attribute with labels [B], [B, C]"
        )
    raise ValueError(
        f"logits must be a list of [B, C_j] tensors, or of shape [B, A, C], [B, A] or [B, C]; got {_shape(logits)}"
    )


def normalise(features, logits: LogitsLike, labels, validate: bool = True) -> Batch:
    """Checks shapes, dtypes and devices (always) and values (when `validate`), and normalises.

    `features` may be None for the cross-entropy alone.
    """
    labels_1d = isinstance(labels, Tensor) and labels.dim() == 1
    labels = _normalise_labels(labels)
    batch_size, num_attributes = labels.shape
    if batch_size < 1:
        raise ValueError("labels must hold at least one sample (B >= 1)")
    if features is not None:
        features = _normalise_features(features, batch_size, num_attributes)

    padded, num_classes = _normalise_logits(logits, batch_size, num_attributes, labels_1d)
    device = padded.device if features is None else features.device
    for name, t in (("logits", padded), ("labels", labels)):
        if t.device != device:
            raise ValueError(
                f"features, logits and labels must be on one device: "
                f"{'logits' if features is None else 'features'} on {device}, {name} on {t.device}"
            )

    batch = Batch(features=features, logits=padded, labels=labels, num_classes=num_classes)
    if validate:
        check_values(batch)
    return batch


def _normalise_features(features, batch_size: int, num_attributes: int) -> Tensor:
    features = _check_tensor("features", features, floating=True)
    if features.dim() == 2:
        features = features[:, None, :].expand(-1, num_attributes, -1)
    elif features.dim() != 3:
        raise ValueError(f"features must have shape [B, A, D] or [B, D], got {_shape(features)}")
    if features.shape[0] != batch_size:
        raise ValueError(
            f"features has batch size {features.shape[0]} but labels have {batch_size} (dim 0 must match)"
        )
    if features.shape[1] != num_attributes:
        raise ValueError(
            f"features [B, A, D] has A={features.shape[1]} but labels have A={num_attributes} attributes"
        )
    if features.shape[2] < 1:
        raise ValueError("features must have a feature size D >= 1")
    return features


_NUM_CLASSES_CACHE: dict = {}


def num_classes_tensor(num_classes: tuple, device: torch.device) -> Tensor:
    """[A] int64 on `device`, cached so a training loop does not copy it to the GPU every step."""
    key = (num_classes, device)
    cached = _NUM_CLASSES_CACHE.get(key)
    if cached is None:
        cached = torch.tensor(num_classes, dtype=torch.long, device=device)
        _NUM_CLASSES_CACHE[key] = cached
    return cached


def _label_range_error(labels: Tensor, limits: Tensor) -> Tensor:
    return (labels < -1) | (labels >= limits)


def _raise_label_error(labels: Tensor, limits: Tensor, num_classes: tuple) -> None:
    i, j = _label_range_error(labels, limits).nonzero()[0].tolist()
    raise ValueError(
        f"labels[{i}, {j}] = {labels[i, j].item()} is out of range for attribute {j}: "
        f"expected -1 (not annotated) or a class in 0..{num_classes[j] - 1}"
    )


def normalise_labels(labels, num_classes) -> tuple[Tensor, tuple]:
    """labels [B, A] or [B] with num_classes (an int for all attributes, or one per attribute), checked."""
    labels = _normalise_labels(labels)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        num_classes = (num_classes,) * labels.shape[1]
    num_classes = tuple(int(c) for c in num_classes)
    if len(num_classes) != labels.shape[1]:
        raise ValueError(f"num_classes has {len(num_classes)} entries but labels have A={labels.shape[1]} attributes")
    if any(c < 2 for c in num_classes):
        raise ValueError(f"num_classes must be >= 2 for every attribute, got {num_classes}")
    if not torch.compiler.is_compiling():
        limits = num_classes_tensor(num_classes, labels.device)
        if bool(_label_range_error(labels, limits).any()):
            _raise_label_error(labels, limits, num_classes)
    return labels, num_classes


def check_values(batch: Batch) -> None:
    """Label ranges and finite inputs: one reduction and one host synchronisation, details only on
    failure. Skipped while torch.compile traces (a host synchronisation would break the graph)."""
    if torch.compiler.is_compiling():
        return
    labels = batch.labels
    limits = num_classes_tensor(batch.num_classes, labels.device)
    checks = [("labels", _label_range_error(labels, limits).any())]
    if batch.features is not None:
        checks.append(("features", ~torch.isfinite(batch.features).all()))
    # Past each attribute's C_j the padded logits are -inf by construction.
    padding = torch.arange(batch.max_classes, device=labels.device) >= limits[:, None]  # [A, Cmax]
    checks.append(("logits", ~(torch.isfinite(batch.logits) | padding).all()))
    flags = torch.stack([flag for _, flag in checks])
    if not bool(flags.any()):
        return
    failed = checks[flags.tolist().index(True)][0]
    if failed == "labels":
        _raise_label_error(labels, limits, batch.num_classes)
    raise ValueError(f"{failed} contain NaN or inf; CRL needs finite {failed}")
