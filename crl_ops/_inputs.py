"""The vocabulary of crl-ops and its argument checks, and the input conventions.

Every accepted shape of (features, logits, labels) becomes one `Batch` (docs/semantics.md,
"Inputs"); nothing is copied where a view will do, so that the kernels read the caller's
tensors in place:

- features  [B, A, D]   (a [B, D] input is expanded, not copied)
- logits    [B, A] binary (one logit z per attribute, meaning the class logits [0, z]) or
            [B, A, Cmax]; a list of [B, C_j] tensors is stacked into [B, A, Cmax] (entries past
            C_j are never read)
- labels    [B, A] int64, -1 = not annotated
- num_classes  (C_1, ..., C_A), and the same as an int64 tensor on the batch's device
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

LogitsLike = Union[Tensor, Sequence[Tensor]]
MarginLike = Union[None, float, Sequence[float], Tensor]

MODES = ("class", "instance")
FORMS = ("relative", "absolute", "distribution")
REDUCTIONS = ("pooled", "attribute")
DISTANCES = ("feature", "score")
BACKENDS = ("auto", "native", "reference")
BATCH_SIZES = ("gathered", "equal")

FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_K = 1024
MAX_BINS = 100_000


@dataclass(frozen=True)
class Batch:
    features: Optional[Tensor]
    logits: Tensor
    labels: Tensor
    num_classes: tuple

    @property
    def max_classes(self) -> int:
        return self.logits.shape[-1] if self.logits.dim() == 3 else 2

    def classes_tensor(self) -> Tensor:
        return num_classes_tensor(self.num_classes, self.labels.device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half, bfloat16 and float32 inputs; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32  # torch.promote_types would dispatch an op


# ---- arguments -------------------------------------------------------------------------------------------


def check_choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def check_k(k) -> int:
    return check_int("k", k, 1, MAX_K)


def check_bins(bins) -> int:
    return check_int("bins", bins, 2, MAX_BINS)


def check_float(name: str, value, minimum: Optional[float] = None, maximum: Optional[float] = None,
                open_minimum: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    low_ok = minimum is None or (value > minimum if open_minimum else value >= minimum)
    if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if open_minimum else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        raise ValueError(f"{name} must be finite{' and ' + ' and '.join(bounds) if bounds else ''}, got {value}")
    return value


def check_threshold(threshold) -> float:
    return check_float("threshold", threshold, minimum=0.0, maximum=1.0, open_minimum=True)


def check_margin(margin: MarginLike) -> MarginLike:
    """None (2*pi/C_j), one float, one float per attribute, or a float tensor [A] or [] (which may
    require grad: the loss then has a gradient w.r.t. it)."""
    if margin is None:
        return None
    if isinstance(margin, Tensor):
        if not margin.is_floating_point():
            raise TypeError(f"margin tensor must be floating point, got dtype {margin.dtype}")
        if margin.dim() > 1:
            raise ValueError(f"margin tensor must have shape [A] or [], got {_shape(margin)}")
        if margin.device.type != "meta" and not torch.compiler.is_compiling() and not bool(
                torch.isfinite(margin.detach()).all()):
            raise ValueError("margin tensor must be finite, got NaN or inf")
        return margin
    if isinstance(margin, (int, float)) and not isinstance(margin, bool):
        return check_float("margin", margin)
    if isinstance(margin, Sequence) and not isinstance(margin, (str, bytes)):
        return tuple(check_float(f"margin[{j}]", m) for j, m in enumerate(margin))
    raise TypeError(f"margin must be None, a float, one float per attribute or a tensor, got {type(margin).__name__}")


def check_num_classes(num_classes, num_attributes: int) -> tuple:
    """An int for every attribute, or one int per attribute, each >= 2."""
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        num_classes = (num_classes,) * num_attributes
    elif isinstance(num_classes, Tensor) and num_classes.dim() <= 1 and not num_classes.is_floating_point():
        num_classes = tuple(int(c) for c in num_classes.reshape(-1).tolist())
        if len(num_classes) == 1:
            num_classes *= num_attributes
    elif isinstance(num_classes, Sequence) and not isinstance(num_classes, (str, bytes)):
        for j, c in enumerate(num_classes):
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"num_classes[{j}] must be an int, got {type(c).__name__}")
        num_classes = tuple(num_classes)
    else:
        raise TypeError(f"num_classes must be an int or a sequence of ints, got {type(num_classes).__name__}")
    if len(num_classes) != num_attributes:
        raise ValueError(f"num_classes has {len(num_classes)} entries but labels have A={num_attributes} attributes")
    if any(c < 2 for c in num_classes):
        raise ValueError(f"num_classes must be >= 2 for every attribute, got {num_classes}")
    return num_classes


# ---- tensors ------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, value, floating: bool) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if floating and value.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {value.dtype}")
    if not floating and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(
            f"{name} must be an integer tensor (class indices, -1 = not annotated), got dtype {value.dtype}"
        )
    return value


def _normalise_labels(labels, empty_ok: bool = False) -> Tensor:
    labels = check_tensor("labels", labels, floating=False)
    if labels.dim() == 1:
        labels = labels[:, None]
    elif labels.dim() != 2:
        raise ValueError(f"labels must have shape [B, A] or [B], got {_shape(labels)}")
    if labels.shape[0] < 1 and not empty_ok:
        raise ValueError("labels must hold at least one sample (B >= 1)")
    if labels.shape[1] < 1:
        raise ValueError("labels must have at least one attribute (A >= 1), got shape " + _shape(labels))
    return labels if labels.dtype == torch.long else labels.long()


def _stack_logits(logits: Sequence[Tensor], batch_size: int, num_attributes: int):
    if len(logits) != num_attributes:
        raise ValueError(
            f"logits is a list of {len(logits)} tensors but labels have {num_attributes} attributes; "
            "give one [B, C_j] tensor per attribute"
        )
    for j, lj in enumerate(logits):
        check_tensor(f"logits[{j}]", lj, floating=True)
        if lj.dim() != 2 or lj.shape[0] != batch_size or lj.shape[1] < 2:
            raise ValueError(f"logits[{j}] must have shape [B={batch_size}, C_j >= 2], got {_shape(lj)}")
    devices = {lj.device for lj in logits}
    if len(devices) > 1:
        raise ValueError(f"all logits must be on one device, got {sorted(map(str, devices))}")
    dtype = logits[0].dtype
    for lj in logits[1:]:
        if lj.dtype != dtype:  # each call of torch.promote_types is a dispatched op
            dtype = torch.promote_types(dtype, lj.dtype)
    num_classes = tuple(int(lj.shape[1]) for lj in logits)
    cmax = max(num_classes)
    columns = []
    for lj in logits:  # entries past C_j are never read: pad with zeros
        lj = lj if lj.dtype == dtype else lj.to(dtype)
        columns.append(lj if lj.shape[1] == cmax else torch.nn.functional.pad(lj, (0, cmax - lj.shape[1])))
    return torch.stack(columns, dim=1), num_classes


def _normalise_logits(logits: LogitsLike, batch_size: int, num_attributes: int, labels_1d: bool):
    """(logits [B, A] binary or [B, A, Cmax], num_classes)."""
    if isinstance(logits, (list, tuple)):
        return _stack_logits(logits, batch_size, num_attributes)
    logits = check_tensor("logits", logits, floating=True)
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
            return logits, (2,) * num_attributes  # one logit z per binary attribute: class logits [0, z]
        if num_attributes == 1 and width >= 2:
            return logits[:, None, :], (int(width),)
        raise ValueError(
            f"logits of shape {_shape(logits)} do not match labels with A={num_attributes} attributes: "
            "expected [B, A] (one logit per binary attribute) or, for a single attribute with labels [B], [B, C]"
        )
    raise ValueError(
        f"logits must be a list of [B, C_j] tensors, or of shape [B, A, C], [B, A] or [B, C]; got {_shape(logits)}"
    )


def _normalise_features(features, batch_size: int, num_attributes: int) -> Tensor:
    features = check_tensor("features", features, floating=True)
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


def normalise(features, logits: LogitsLike, labels, with_features: bool = True, empty_ok: bool = False) -> Batch:
    """Checks shapes, dtypes and devices, and normalises. with_features=False: the cross-entropy
    alone, without features (`features` must be None). empty_ok: a batch of no sample is accepted
    (distributed=True: a rank's share of the global batch may be empty).

    The value checks (label ranges, finite values) happen inside the ops (validate=True)."""
    labels_1d = isinstance(labels, Tensor) and labels.dim() == 1
    labels = _normalise_labels(labels, empty_ok)
    batch_size, num_attributes = labels.shape
    if with_features:
        features = _normalise_features(features, batch_size, num_attributes)
    logits, num_classes = _normalise_logits(logits, batch_size, num_attributes, labels_1d)
    device = logits.device if features is None else features.device
    for name, t in (("logits", logits), ("labels", labels)):
        if t.device != device:
            raise ValueError(
                f"features, logits and labels must be on one device: "
                f"{'logits' if features is None else 'features'} on {device}, {name} on {t.device}"
            )
    return Batch(features=features, logits=logits, labels=labels, num_classes=num_classes)


def normalise_labels(labels, num_classes) -> tuple[Tensor, tuple]:
    """labels [B, A] or [B] with num_classes (an int for all attributes, or one per attribute)."""
    labels = _normalise_labels(labels)
    return labels, check_num_classes(num_classes, labels.shape[1])


# ---- small constant tensors, cached per device --------------------------------------------------------------

_CONSTANTS: dict = {}


def cached_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A constant tensor on `device`, made once, so that a training loop does not copy it to the
    GPU every step. Made outside inference mode even when first asked for inside it, so that a
    later training step can save it for backward."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)  # a constant of the graph: no guard on the cache
    key = (values, dtype, device)
    cached = _CONSTANTS.get(key)
    if cached is None:
        with torch.inference_mode(False):
            cached = torch.tensor(values, dtype=dtype, device=device)
        _CONSTANTS[key] = cached
    return cached


def num_classes_tensor(num_classes: tuple, device: torch.device) -> Tensor:
    """[A] int64 on `device`."""
    return cached_tensor(num_classes, torch.long, device)
