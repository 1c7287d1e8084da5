"""What a run measures: groups of (shape, variant) timed side by side, in priority order."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Sequence

from .implementations import Variant
from .problems import CONFIGS, LONG_TAIL, Shape, binary_shape

BATCH_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SWEEPS = {  # parameter -> values: A, D and K around the CelebA-like shape at B=256; C on one long-tail attribute
    "A": (1, 5, 10, 20, 40, 80, 160),
    "D": (16, 32, 64, 128, 256, 512, 1024),
    "K": (5, 16, 32, 64),
    "C": (2, 10, 100, 1000, 10_000, 100_000),
}
QUICK_SWEEPS = ("K", "C")  # also in the quick run, for the relative variants, native kernels only
SWEEP_BATCH = 256
CLASS_SWEEP_BATCH = 512


@dataclass(frozen=True)
class Group:
    """One shape and variant; the implementations are timed on the same inputs, interleaved."""

    section: int  # 1: configs, 3: sweeps (2 is the training step, run between them)
    shape: Shape
    variant: Variant
    impls: tuple
    tags: frozenset  # "config:<name>" and "sweep:<parameter>" it belongs to


def _swept_shape(parameter: str, value: int) -> Shape:
    if parameter == "B":
        return binary_shape(batch_size=value)
    if parameter == "A":
        return binary_shape(batch_size=SWEEP_BATCH, num_attributes=value)
    if parameter == "D":
        return binary_shape(batch_size=SWEEP_BATCH, dim=value)
    if parameter == "K":
        return binary_shape(batch_size=SWEEP_BATCH, k=value)
    return Shape(LONG_TAIL, CLASS_SWEEP_BATCH, (value,), 64)


def build_plan(full: bool, cuda: bool, impls: Sequence[str], variants: Sequence[Variant]) -> List[Group]:
    """The quick plan: the CelebA- and X-Domain-like configs (and the large one on a GPU) for every
    variant, a batch-size sweep of instance-relative (plus class-relative on a GPU) from B=128 to
    1024 on the CPU, 16384 on a GPU, and the sweeps of K and C for the two relative variants on
    the native kernels alone (their fraction of the floor). The full plan: all configs, the batch
    sweep to 16384 for every variant, and the sweeps of A, D, K and C for the two relative
    variants, every implementation."""
    configs = ("celeba", "xdomain", "large") if full or cuda else ("celeba", "xdomain")
    groups = [Group(1, CONFIGS[name], v, tuple(impls), frozenset({f"config:{name}"}))
              for name in configs for v in variants]
    if full:
        batch_variants = list(variants)
    else:
        batch_variants = [v for v in variants if v.form == "relative" and (cuda or v.mode == "instance")]
    largest = 16384 if full or cuda else 1024
    groups += [Group(3, _swept_shape("B", b), v, tuple(impls), frozenset({"sweep:B"}))
               for v in batch_variants for b in BATCH_SIZES if b <= largest]
    swept = SWEEPS if full else {p: SWEEPS[p] for p in QUICK_SWEEPS}
    sweep_impls = tuple(impls) if full else tuple(i for i in impls if i == "native")
    if sweep_impls:
        groups += [Group(3, _swept_shape(p, value), v, sweep_impls, frozenset({f"sweep:{p}"}))
                   for p, values in swept.items() for v in variants if v.form == "relative" for value in values]
    return _merge(groups)


def _merge(groups: List[Group]) -> List[Group]:
    """One group per (shape, variant), in its earliest section, carrying every tag and implementation; ordered by
    section, then by batch size: the extrapolation of cost has smaller batches to go by, and a
    short budget cuts the largest batches of the sweeps, the costliest cases."""
    merged = {}
    for g in groups:
        key = (g.shape, g.variant)
        if key in merged:
            old = merged[key]
            impls = tuple(i for i in dict.fromkeys(old.impls + g.impls))
            merged[key] = replace(old, section=min(old.section, g.section), tags=old.tags | g.tags, impls=impls)
        else:
            merged[key] = g
    return sorted(merged.values(), key=lambda g: (g.section, g.shape.batch_size, g.variant, g.shape.num_attributes,
                                                   g.shape.dim, g.shape.k, g.shape.num_classes))
