"""The implementations compared, each computing CRL(mode, form) on the same inputs."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import crl_ops

from .loop_crl import LoopCRL


@dataclass(frozen=True, order=True)
class Variant:
    mode: str  # "class" or "instance"
    form: str  # "relative", "absolute" or "distribution"

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.form}"

    @classmethod
    def parse(cls, name: str) -> "Variant":
        mode, _, form = name.partition("-")
        return cls(mode, form)


VARIANTS = tuple(Variant(m, f) for m in ("class", "instance") for f in ("relative", "absolute", "distribution"))

IMPLEMENTATIONS = ("native", "reference", "loop", "pml")

LABELS = {"native": "native", "reference": "reference", "loop": "loops", "pml": "PML"}

COVERAGE = {  # what each implementation is, for the report
    "native": "crl-ops' C++/CUDA kernels, `crl_ops.CRL(mode, form, backend=\"native\")` with its default settings "
              "(validate=True: the value checks run inside the ops); its mining alone is `crl_ops.mine(..., "
              "backend=\"native\")`.",
    "reference": "crl-ops' pure-PyTorch reference, `crl_ops.CRL(mode, form, backend=\"reference\")` with its "
                 "default settings, vectorised over samples, classes and attributes.",
    "loop": "CRL written without a library, `benchmarks/loop_crl.py`: the paper step by step, Python loops "
            "over attributes and minority classes, vectorised within one class; all six variants.",
    "pml": "pytorch-metric-learning on crl-ops' mining, `benchmarks/pml_crl.py`: `crl_ops.mine` (PML has no "
           "miner for per-batch minority classes), then per attribute PML's `TripletMarginLoss` (relative) or "
           "`ContrastiveLoss` (absolute) with `LpDistance(normalize_embeddings=False)` and `DoNothingReducer`; "
           "the pooled means (and, for absolute, the squared hinges) are taken on PML's per-triplet and per-pair "
           "losses. PML's `HistogramLoss` counts each unordered pair once and only pairs inside triplets, so it "
           "is not the distribution form: its value is reported, never timed.",
}

DIFFERENT_FUNCTION = {
    ("pml", "distribution"): "PML's HistogramLoss keeps each unordered pair once and only pairs inside triplets",
}

# Loss values must agree to this relative tolerance (float32) before an implementation is timed.
RELATIVE_TOLERANCE = 1e-4
ABSOLUTE_TOLERANCE = 1e-6

LossFn = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


def unavailable(impl: str, device: torch.device) -> Optional[str]:
    """Why `impl` cannot run on `device`, or None."""
    if impl == "native" and not crl_ops.native_available(device):
        return f"crl-ops native kernels are not built for {device.type}"
    if impl == "pml":
        try:
            importlib.import_module(".pml_crl", __package__)
        except ImportError as error:  # not installed, or one of its imports (scipy, tqdm) is missing
            return f"pytorch-metric-learning cannot be imported: {error}"
    return None


def make_loss(impl: str, variant: Variant, k: int) -> LossFn:
    if impl in ("native", "reference"):
        return crl_ops.CRL(variant.mode, variant.form, k=k, backend=impl)
    if impl == "loop":
        return LoopCRL(variant.mode, variant.form, k=k)
    from .pml_crl import PMLCRL  # optional dependency

    return PMLCRL(variant.mode, variant.form, k=k)


def values_agree(value: float, baseline: float) -> bool:
    return abs(value - baseline) <= ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * abs(baseline)
