#!/usr/bin/env python
"""The adversarial pass of `distributed=True` (issue #22): inputs that disagree between gloo CPU
ranks, or are bad on one rank, against two checkouts (before and after the fixes).

Every case is one world of 2 (some 3) gloo ranks running `crl_ops.CRL` or `crl_ops.BalancedLoss`
with `distributed=True` on float64 batches: usually one step whose inputs or options differ on
one rank (the "odd" rank), sometimes after a first good step, and always followed by a good
step on every rank (are the ranks still in step after an error?). Each rank also computes, before
joining the process group, what one process gives on the concatenated batch (rank 0's options,
`distributed=False`), and compares its own loss (1e-12) and gradients (W times its rows of the
single-process gradient, 1e-10) with it.

Every run is bounded: the process group has a collective timeout (--collective-timeout), and the
world is killed after --case-timeout seconds. A case's outcome is that of its first step that is
not "ok":
- "ok": the documented result: every rank raises the same kind of clear error (a ValueError or
  TypeError naming the disagreement or argument) in the same step, or every rank returns the
  single-process loss and gradients;
- "clear error on some ranks only": some rank raises a clear error while another hangs or returns;
- "wrong answer": every rank returns, but the losses differ between ranks or from one process (or
  the gradients do), or a documented error was not raised;
- "hang": a rank waits forever (killed at the case timeout) or until its collective timeout, and
  no rank raised an error of its own;
- "crash": a rank died of a signal;
- "unclear error": every rank raised, but some error is not a clear one (another type, a message
  not naming the argument, or an error where a result is documented).

Both checkouts run the same cases: each gets a driver process (PYTHONPATH=<checkout>) that imports
torch and the checkout's crl_ops once and forks the ranks of every world from itself, so that a
world starts in milliseconds. Seeds are fixed.

    git -C /work/main worktree add /work/base-d2efe17 d2efe17
    (cd /work/base-d2efe17 && FORCE_CUDA=0 python setup.py -q build_ext --inplace)
    nice -n 10 python tools/adversarial_distributed.py --before /work/base-d2efe17 --after /work/main \\
        --out benchmarks/results/2026-12-07-cpu-adversarial-distributed --case-timeout 60

`--cases REGEX` runs the matching cases only; `--report --out DIR` rewrites results.md from
DIR/results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AREAS = {
    "options": "1. CRL options that differ on one rank",
    "formats": "2. Input formats that differ on one rank",
    "values": "3. Bad values on one rank",
    "batch sizes": "4. Batch sizes",
    "usage": "5. How the ranks call it: forward, backward, evaluation",
}
OUTCOMES = ("ok", "clear error on some ranks only", "wrong answer", "hang", "crash", "unclear error")
BACKENDS = ("reference", "native")
LOSS_TOLERANCE = 1e-12  # absolute and relative, float64
GRAD_RTOL, GRAD_ATOL = 1e-10, 1e-12
EXPECTATIONS = {
    "raises": "a clear error on every rank",
    "as one process": "what one process gives on the concatenated batch (its loss, or its error on every rank)",
    "either": "an equivalent format: a clear error on every rank, or the single-process result",
    "trusted": "documented as not checked (a requirement on the caller); judged as 'either'",
}


# ---- cases ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One world. The odd rank (`odd_rank`, default the last) gets `odd_options`, `odd_entry`,
    `reformat` and `odd_call` at the adversarial step, the last of `sizes`; `values` changes the
    global batch at that step (on the odd rank's rows)."""

    area: str
    name: str
    expect: str  # a key of EXPECTATIONS
    words: tuple = ()  # regular expressions a clear error's message must match (case-insensitive)
    world: int = 2
    sizes: tuple = ()  # rows per rank at each step before the next good one; default: one step, see plan()
    options: dict = field(default_factory=dict)  # every rank's (with k=3 and the case's backend)
    odd_options: dict = field(default_factory=dict)
    odd_rank: int = -1
    entry: str = "CRL"
    odd_entry: Optional[str] = None
    data: dict = field(default_factory=dict)  # the global batch's format, see global_batch()
    values: Optional[Callable] = None  # (global batch, odd rank's rows) -> None, in place
    reformat: Optional[Callable] = None  # (features, logits, labels) -> the same, differentiably
    odd_call: Optional[str] = None  # "skip backward" | "forward twice" | "detach features"
    evaluation: bool = False  # every rank's forward under torch.no_grad(), no backward
    compare_odd_grads: bool = True  # False where the odd rank's format routes the gradient differently
    backends: tuple = BACKENDS
    note: str = ""
    backend: str = ""  # set per run

    @property
    def id(self) -> str:
        return f"{self.area}/{self.name}/{self.backend}"


def layout_words(token: str) -> tuple:
    """A layout mismatch: the message says that the ranks differ and shows the field."""
    return (r"differ", token)


def tensor_margin(*values, requires_grad=False):
    """Made in the rank (a callable), not in the driver that forks the ranks; one value: a [] tensor."""
    return lambda: torch.tensor(values[0] if len(values) == 1 else values, dtype=torch.float64,
                                requires_grad=requires_grad)


# Value changes on the global batch, at the odd rank's first row.
def nan_feature(batch, rows):
    batch["features"][rows.start, 0, 0] = math.nan


def inf_logit(batch, rows):
    batch["logits"][0][rows.start, 0] = math.inf


def nan_logit(batch, rows):
    batch["logits"][1][rows.start, 1] = math.nan


def label_too_large(batch, rows):
    batch["labels"][rows.start, 2] = 4  # attribute 2 has 4 classes


def label_below_minus_one(batch, rows):
    batch["labels"][rows.start, 1] = -2


def huge_features(batch, rows):
    batch["features"][rows] *= 1e200  # squared distances overflow float64


def nan_feature_unannotated_row(batch, rows):
    batch["labels"][rows.start] = -1
    batch["features"][rows.start, 0, 0] = math.nan


def unannotated_rank(batch, rows):
    batch["labels"][rows] = -1


def unannotated_everywhere(batch, rows):
    batch["labels"].fill_(-1)


# Format changes on the odd rank (differentiable, so that gradients reach the canonical leaves).
def binary_as_two_columns(f, l, y):
    return f, torch.stack([torch.zeros_like(l), l], -1), y


def list_as_padded_tensor(f, l, y):
    width = max(x.shape[1] for x in l)
    return f, torch.stack([F.pad(x, (0, width - x.shape[1])) for x in l], 1), y


def shared_as_copies(f, l, y):
    return f[:, None].expand(-1, y.shape[1], -1).contiguous(), l, y


def copies_as_stride0_view(f, l, y):
    return f[:, :1].expand(-1, f.shape[1], -1), l, y


def wider_features(f, l, y):
    return torch.cat([f, f[..., :1]], -1), l, y


def float32_features(f, l, y):
    return f.float(), l, y


def float32_logits(f, l, y):
    return f, [x.float() for x in l], y


def int32_labels(f, l, y):
    return f, l, y.int()


def labels_as_column(f, l, y):
    return f, l[:, None, :], y[:, None]


def fewer_attributes(f, l, y):
    return f[:, :2], l[:2], y[:, :2]


def one_more_class(f, l, y):
    return f, l[:-1] + [F.pad(l[-1], (0, 1))], y


def non_contiguous_features(f, l, y):
    return f.transpose(0, 1).contiguous().transpose(0, 1), l, y


def all_cases() -> list[Case]:
    cases = []

    def add(*args, **kwargs):
        cases.append(Case(*args, **kwargs))

    # 1. options that differ on the last rank (the base: instance mode, relative form, k=3)
    area = "options"
    add(area, "mode: instance vs class", "raises", layout_words("mode"), odd_options=dict(mode="class"))
    add(area, "form: relative vs absolute", "raises", layout_words("form"), odd_options=dict(form="absolute"))
    add(area, "k: 3 vs 4", "raises", layout_words(r"k"), odd_options=dict(k=4))
    add(area, "margin: None vs 1.0", "raises", layout_words("margin"), odd_options=dict(margin=1.0))
    add(area, "margin: 0.5 vs 0.7", "raises", layout_words("margin"), options=dict(margin=0.5),
        odd_options=dict(margin=0.7))
    add(area, "margin: float 0.5 vs tensor [0.5]*A (same margins)", "either", layout_words("margin"),
        options=dict(margin=0.5), odd_options=dict(margin=tensor_margin(0.5, 0.5, 0.5)))
    add(area, "margin: float 0.5 vs per-attribute (0.5, 0.5, 0.5) (same margins)", "either",
        layout_words("margin"), options=dict(margin=0.5), odd_options=dict(margin=(0.5, 0.5, 0.5)))
    add(area, "margin: tensor [] vs tensor [A] (same margins)", "either", layout_words("margin"),
        options=dict(margin=tensor_margin(0.5)), odd_options=dict(margin=tensor_margin(0.5, 0.5, 0.5)))
    add(area, "margin: tensors with different values", "trusted", layout_words("margin"),
        options=dict(margin=tensor_margin(0.5, 0.9, 1.3)), odd_options=dict(margin=tensor_margin(0.5, 0.7, 1.3)),
        note="the code comment says a tensor margin's values are not read (DDP keeps parameters equal)")
    add(area, "margin: tensor requires grad on one rank only (same values)", "either", layout_words("margin"),
        options=dict(margin=tensor_margin(0.5, 0.9, 1.3, requires_grad=True)),
        odd_options=dict(margin=tensor_margin(0.5, 0.9, 1.3)))
    add(area, "apc_margin: 1.0 vs 2.0 (absolute form)", "raises", layout_words("apc_margin"),
        options=dict(form="absolute"), odd_options=dict(apc_margin=2.0))
    add(area, "bins: 7 vs 9 (distribution form)", "raises", layout_words("bins"),
        options=dict(form="distribution", bins=7), odd_options=dict(bins=9))
    add(area, "threshold: 0.5 vs 0.6", "raises", layout_words("threshold"), odd_options=dict(threshold=0.6))
    add(area, "normalize: False vs True", "raises", layout_words("normalize"), odd_options=dict(normalize=True))
    add(area, "reduction: pooled vs attribute", "raises", layout_words("reduction"),
        odd_options=dict(reduction="attribute"))
    add(area, "distance: feature vs score (class, relative)", "raises", layout_words("distance"),
        options=dict(mode="class"), odd_options=dict(distance="score"))
    add(area, "validate: True vs False", "raises", layout_words("validate"), odd_options=dict(validate=False))
    add(area, "batch_sizes: gathered vs equal (equal sizes)", "raises", layout_words("batch_sizes"),
        sizes=((6, 6),), odd_options=dict(batch_sizes="equal"))
    add(area, "backend: reference vs native (same function)", "as one process", backends=("reference",),
        odd_options=dict(backend="native"))
    add(area, "track_stats: True vs False (no effect on the loss)", "as one process",
        odd_options=dict(track_stats=False))
    add(area, "mode differs on the middle rank of 3", "raises", layout_words("mode"), world=3, odd_rank=1,
        odd_options=dict(mode="class"))
    add(area, "BalancedLoss weight: 1.0 vs 0.5", "raises", ("weight",), entry="BalancedLoss",
        odd_options=dict(weight=0.5))
    add(area, "BalancedLoss alpha: None vs 0.5", "raises", ("alpha",), entry="BalancedLoss",
        odd_options=dict(alpha=0.5))
    add(area, "entry: BalancedLoss vs CRL on the last rank", "raises", (r"differ|BalancedLoss|cross",),
        entry="BalancedLoss", odd_entry="CRL")

    # 2. input formats that differ on the last rank
    area = "formats"
    add(area, "logits: binary [B, A] vs [B, A, 2] as [0, z] (same logits)", "either", (r"differ", r"logits"),
        data=dict(classes=(2, 2, 2), logits="binary"), reformat=binary_as_two_columns)
    add(area, "logits: list of [B, C_j] (2, 3, 4) vs [B, A, 4] tensor", "raises", (r"differ", r"classes"),
        reformat=list_as_padded_tensor)
    add(area, "logits: list of [B, 3] vs [B, A, 3] tensor (same logits)", "either", (r"differ",),
        data=dict(classes=(3, 3, 3)), reformat=list_as_padded_tensor)
    add(area, "features: [B, D] shared vs [B, A, D] copies (same values)", "either", (r"differ", r"features"),
        data=dict(features="shared", classes=(2, 2, 2), logits="binary"), reformat=shared_as_copies)
    add(area, "features: [B, A, D] contiguous vs an expanded stride-0 view (same values)", "either",
        (r"differ", r"features"), data=dict(features="same per attribute"), reformat=copies_as_stride0_view,
        compare_odd_grads=False)
    add(area, "features: non-contiguous on one rank (same values)", "as one process",
        reformat=non_contiguous_features)
    add(area, "feature size D: 4 vs 5", "raises", (r"differ", r"features"), reformat=wider_features)
    add(area, "features dtype: float64 vs float32", "raises", (r"differ", r"float"), reformat=float32_features)
    add(area, "logits dtype: float64 vs float32", "raises", (r"differ", r"float"), reformat=float32_logits)
    add(area, "labels dtype: int64 vs int32 (converted)", "as one process", reformat=int32_labels)
    add(area, "labels [B] with logits [B, C] vs [B, 1] with [B, 1, C] (same batch)", "either", (r"differ",),
        data=dict(classes=(3,), logits="single", features="shared"), reformat=labels_as_column)
    add(area, "number of attributes: 3 vs 2", "raises", (r"differ",), reformat=fewer_attributes)
    add(area, "class counts: (2, 3, 4) vs (2, 3, 5)", "raises", (r"differ", r"classes"), reformat=one_more_class)

    # 3. bad values on the last rank (as one process: its error on every rank, or its NaN loss)
    area = "values"
    nan_word = (r"NaN|inf",)
    for validate in (True, False):
        tag = f"validate={validate}"
        checked = dict(validate=validate)
        add(area, f"NaN feature, {tag}", "as one process", nan_word, options=checked, values=nan_feature)
        add(area, f"inf logit, {tag}", "as one process", nan_word, options=checked, values=inf_logit)
        add(area, f"label = C_j, {tag}", "as one process", (r"label",), options=checked, values=label_too_large)
        add(area, f"label = -2, {tag}", "as one process", (r"label",), options=checked,
            values=label_below_minus_one)
        add(area, f"huge features (distance overflows), {tag}", "as one process", (r"too large|overflow",),
            options=checked, values=huge_features)
        add(area, f"NaN feature, class mode, {tag}", "as one process", nan_word,
            options=dict(checked, mode="class"), values=nan_feature)
        add(area, f"NaN feature, distribution form, {tag}", "as one process", nan_word,
            options=dict(checked, form="distribution", bins=7), values=nan_feature)
        add(area, f"NaN logit, distance=score, {tag}", "as one process", nan_word,
            options=dict(checked, mode="class", distance="score"), values=nan_logit)
    for validate in (True, False):
        add(area, f"NaN logit, BalancedLoss, validate={validate}", "as one process", nan_word, entry="BalancedLoss",
            options=dict(validate=validate), values=nan_logit)
    add(area, "NaN feature in an unannotated row, validate=True", "as one process", nan_word,
        values=nan_feature_unannotated_row)
    add(area, "NaN feature on the middle rank of 3, validate=True", "as one process", nan_word, world=3,
        odd_rank=1, values=nan_feature)
    add(area, "NaN feature on the middle rank of 3, validate=False", "as one process", nan_word, world=3,
        odd_rank=1, options=dict(validate=False), values=nan_feature)

    # 4. batch sizes
    area = "batch sizes"
    for label, options in (("instance, relative", {}), ("class, relative", dict(mode="class")),
                           ("instance, distribution", dict(form="distribution", bins=7)),
                           ("class, absolute", dict(mode="class", form="absolute")),
                           ("distance=score", dict(mode="class", distance="score")),
                           ("validate=False", dict(validate=False))):
        add(area, f"empty last rank (B=0), gathered, {label}", "as one process", sizes=((7, 0),), options=options)
    add(area, "empty last rank (B=0), gathered, BalancedLoss", "as one process", sizes=((7, 0),),
        entry="BalancedLoss")
    add(area, "empty last rank (B=0), gathered, [B, D] features, binary logits", "as one process",
        sizes=((7, 0),), data=dict(features="shared", classes=(2, 2, 2), logits="binary"))
    add(area, "empty first rank (B=0), gathered", "as one process", sizes=((0, 7),))
    add(area, "empty middle rank of 3 (B=0), gathered", "as one process", world=3, sizes=((6, 0, 5),))
    add(area, "empty on every rank, gathered", "as one process", (r"at least one sample|empty",), sizes=((0, 0),))
    add(area, "empty on every rank, equal", "as one process", (r"at least one sample|empty",), sizes=((0, 0),),
        options=dict(batch_sizes="equal"))
    add(area, "equal: empty last rank at the first step", "raises", (r"batch.sizes",), sizes=((7, 0),),
        options=dict(batch_sizes="equal"))
    add(area, "equal: sizes 7 and 5 at the first step", "raises", (r"batch.sizes",), sizes=((7, 5),),
        options=dict(batch_sizes="equal"))
    add(area, "equal: after a checked step the last rank's size changes alone (7 -> 5)", "trusted",
        (r"batch.sizes",), sizes=((7, 7), (7, 5)), options=dict(batch_sizes="equal"),
        note="docs/scaling.md: between checks the declaration is trusted; such a rank 'would make the "
             "collectives disagree (hang or fail) instead of raising'")
    add(area, "equal: after a checked step the last rank alone is empty (7 -> 0)", "trusted", (r"batch.sizes",),
        sizes=((7, 7), (7, 0)), options=dict(batch_sizes="equal"),
        note="as above: documented as trusted")
    add(area, "equal: every rank's size changes together (7 -> 4, a short last batch)", "as one process",
        sizes=((7, 7), (4, 4)), options=dict(batch_sizes="equal"))
    add(area, "gathered: one sample on a rank (1 and 11)", "as one process", sizes=((1, 11),))
    add(area, "gathered: a rank whose labels are all unannotated", "as one process", values=unannotated_rank)
    add(area, "gathered: every label of every rank unannotated (nothing to mine)", "as one process",
        values=unannotated_everywhere)
    add(area, "gathered: sizes change from step to step ((7, 5) then (3, 9))", "as one process",
        sizes=((7, 5), (3, 9)))

    # 5. calls that differ on one rank (docs/scaling.md, "Requirements")
    area = "usage"
    add(area, "the last rank skips backward", "trusted", (r"backward|differ",), odd_call="skip backward",
        note="docs/scaling.md: every rank must call the forward the same number of times and call backward")
    add(area, "the last rank calls the forward twice", "trusted", (r"forward|differ",), odd_call="forward twice",
        note="as above")
    add(area, "the last rank's features detached (BalancedLoss: its logits still take a gradient)", "either",
        (r"grad|differ",), entry="BalancedLoss", odd_call="detach features", compare_odd_grads=False)
    add(area, "every rank evaluates under torch.no_grad() (no backward)", "as one process", evaluation=True)
    add(area, "every rank evaluates under torch.no_grad(), BalancedLoss, empty last rank", "as one process",
        evaluation=True, entry="BalancedLoss", sizes=((7, 0),))

    runs = []
    for case in cases:
        runs += [replace(case, backend=backend) for backend in case.backends]
    return runs


# ---- a rank --------------------------------------------------------------------------------------------------

DATA = dict(classes=(2, 3, 4), dim=4, logits="list", features="per attribute")


def global_batch(data: dict, size: int, seed: int) -> dict:
    """float64 features and logits and int64 labels of the concatenated batch: class c of an
    attribute has a share of about 0.35**c (each rare class at least twice where the batch allows),
    in random order, and about 15% of the majority labels are unannotated."""
    g = torch.Generator().manual_seed(seed)
    classes, dim, dtype = data["classes"], data["dim"], torch.float64
    attributes = len(classes)
    if data["features"] == "shared":
        features = torch.randn(size, dim, generator=g, dtype=dtype)
    elif data["features"] == "same per attribute":
        features = torch.randn(size, 1, dim, generator=g, dtype=dtype).expand(-1, attributes, -1).contiguous()
    else:
        features = torch.randn(size, attributes, dim, generator=g, dtype=dtype)
    if data["logits"] == "list":
        logits = [torch.randn(size, c, generator=g, dtype=dtype) for c in classes]
    elif data["logits"] == "binary":
        logits = torch.randn(size, attributes, generator=g, dtype=dtype)
    else:  # "single": one attribute, labels [B], logits [B, C]
        logits = torch.randn(size, classes[0], generator=g, dtype=dtype)
    labels = torch.zeros((size, attributes), dtype=torch.long)
    for j, c in enumerate(classes):
        weights = [0.35 ** k for k in range(c)]
        counts = [int(size * w / sum(weights)) for w in weights]
        if size >= 2 * c + 2:  # every rare class at least twice: something to mine in every batch
            counts[1:] = [max(2, n) for n in counts[1:]]
        counts[0] = size - sum(counts[1:])
        labels[:, j] = torch.repeat_interleave(torch.arange(c), torch.tensor(counts))[torch.randperm(size, generator=g)]
    labels[(labels == 0) & (torch.rand(size, attributes, generator=g) < 0.15)] = -1  # some majority rows unannotated
    if data["logits"] == "single":
        labels = labels[:, 0]
    return {"features": features, "logits": logits, "labels": labels}


def rows_of(sizes: tuple, rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def leaves(batch: dict, rows: slice) -> tuple:
    """(features, logits, labels) of `rows` as fresh leaves; the float leaves in a list."""
    def fresh(t):
        return t.detach()[rows].clone().requires_grad_()

    logits = batch["logits"]
    logits = [fresh(x) for x in logits] if isinstance(logits, list) else fresh(logits)
    features = fresh(batch["features"])
    floats = [features] + (logits if isinstance(logits, list) else [logits])
    return features, logits, batch["labels"][rows].clone(), floats


@dataclass
class Step:
    name: str  # "first step" | "adversarial step" | "next good step"
    sizes: tuple
    seed: int
    adversarial: bool


def plan(case: Case) -> list[Step]:
    equal = case.options.get("batch_sizes") == "equal"
    default = {2: (7, 7) if equal else (7, 5), 3: (5, 5, 5) if equal else (6, 5, 4)}[case.world]
    sizes = case.sizes or (default,)
    steps = [Step("first step", s, 10 + i, False) for i, s in enumerate(sizes[:-1])]
    steps.append(Step("adversarial step", sizes[-1], 10 + len(sizes) - 1, True))
    nxt = {2: (6, 6) if equal else (6, 4), 3: (5, 5, 5) if equal else (6, 4, 5)}[case.world]
    steps.append(Step("next good step", nxt, 100, False))
    return steps


def resolved(options: dict) -> dict:
    return {k: (v() if callable(v) else v) for k, v in options.items()}


def base_options(case: Case) -> dict:
    return {"k": 3, **case.options, "backend": case.backend}


def make_loss(crl_ops, entry: str, options: dict, distributed: bool):
    if entry == "CRL":
        options = {k: v for k, v in options.items() if k not in ("weight", "alpha")}
    return getattr(crl_ops, entry)(**resolved(options), distributed=distributed)


def step_batch(case: Case, step: Step) -> dict:
    batch = global_batch({**DATA, **case.data}, sum(step.sizes), step.seed)
    if step.adversarial and case.values is not None:
        case.values(batch, rows_of(step.sizes, case.odd_rank % case.world))
    return batch


def one_process(crl_ops, case: Case, step: Step) -> dict:
    """What one process gives on the concatenated batch with rank 0's options."""
    batch = step_batch(case, step)
    features, logits, labels, floats = leaves(batch, slice(None))
    try:
        loss = make_loss(crl_ops, case.entry, base_options(case), False)(features, logits, labels)
        loss.backward()
    except Exception as error:  # noqa: BLE001 - what one process raises is the expectation
        return {"error": type(error).__name__, "message": first_line(error)}
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in floats]
    return {"loss": loss.item(), "grads": grads}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:2000] if text else ""  # layout messages are long; their fields come last


def collective_failure(error: BaseException) -> Optional[str]:
    """'timeout' or 'peer left' for a rank left waiting in a collective; 'other' for other gloo errors."""
    import torch.distributed as dist

    text = str(error)
    if re.search(r"timed out|timeout", text, re.I):
        return "timeout"
    if re.search(r"connection closed|connection reset|broken pipe|peer", text, re.I):
        return "peer left"
    if isinstance(error, dist.DistError) or "gloo" in text.lower():
        return "other"
    return None


def grad_problem(got: list, expected: list, rows: slice, world: int) -> Optional[str]:
    for index, (g, full) in enumerate(zip(got, expected)):
        want = world * full[rows]
        if g is None:
            g = torch.zeros_like(want)
        try:
            torch.testing.assert_close(g, want, rtol=GRAD_RTOL, atol=GRAD_ATOL, equal_nan=True)
        except AssertionError as error:
            return f"gradient {index}: " + " ".join(str(error).split())[:200]
    return None


def run_rank(case: Case, rank: int, workdir: Path, collective_timeout: float, case_timeout: float):
    """The body of one rank: its events go to rank<r>.jsonl, one JSON object a line."""
    import torch.distributed as dist

    import crl_ops

    log = open(workdir / f"rank{rank}.jsonl", "a", buffering=1)

    def note(**event):
        log.write(json.dumps(event) + "\n")
        log.flush()

    torch.set_num_threads(1)  # the ranks of several worlds share the machine
    steps = plan(case)
    expected = [one_process(crl_ops, case, step) for step in steps]
    note(event="one process", steps=[{k: v for k, v in e.items() if k != "grads"} for e in expected])
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}", rank=rank, world_size=case.world,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    note(event="joined")
    odd = rank == case.odd_rank % case.world
    kept = None  # the rank's loss module, kept from step to step as in training
    for index, step in enumerate(steps):
        note(event="start", step=index)
        try:
            rows = rows_of(step.sizes, rank)
            features, logits, labels, floats = leaves(step_batch(case, step), rows)
            oddly = odd and step.adversarial
            if oddly and case.reformat is not None:
                features, logits, labels = case.reformat(features, logits, labels)
            if oddly and case.odd_call == "detach features":
                features = features.detach()
            if step.name == "next good step":
                loss_fn = make_loss(crl_ops, case.entry, base_options(case), True)
            else:
                if kept is None:
                    kept = make_loss(crl_ops, (case.odd_entry or case.entry) if odd else case.entry,
                                     {**base_options(case), **(case.odd_options if odd else {})}, True)
                loss_fn = kept
            with torch.no_grad() if case.evaluation else contextlib.nullcontext():
                if oddly and case.odd_call == "forward twice":
                    loss_fn(features, logits, labels)
                loss = loss_fn(features, logits, labels)
            grads = None
            if not (case.evaluation or (oddly and case.odd_call == "skip backward")):
                loss.backward()  # as in training: a margin that requires grad gets its gradient too
                grads = [x.grad for x in floats]
            result = {"event": "returned", "step": index, "loss": loss.item()}
            want = expected[index]
            if "loss" in want:
                result["loss_error"] = (0.0 if math.isnan(want["loss"]) and math.isnan(result["loss"])
                                        else abs(result["loss"] - want["loss"]))
                compare = grads is not None and (case.compare_odd_grads or not oddly)
                result["grad_problem"] = grad_problem(list(grads), want["grads"], rows, case.world) if compare else None
            note(**result)
        except Exception as error:  # noqa: BLE001 - every error is recorded and classified
            note(event="raised", step=index, type=type(error).__name__, message=first_line(error),
                 collective=collective_failure(error))
    note(event="finished")
    (workdir / f"rank{rank}.done").touch()
    deadline = time.time() + case_timeout  # stay in the group until every rank is done: no early "peer left"
    while not (workdir / "release").exists() and time.time() < deadline:
        time.sleep(0.05)


# ---- the driver: one per checkout, forks the ranks of each world ---------------------------------------------


@dataclass
class World:
    case: Case
    workdir: Path
    started: float
    pids: list
    status: dict = field(default_factory=dict)  # rank -> "exit N" | "signal NAME" | "killed"
    released: bool = False


def start_world(case: Case, scratch: Path, args) -> World:
    workdir = scratch / re.sub(r"[^A-Za-z0-9]+", "-", case.id)[:150]
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    pids = []
    for rank in range(case.world):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the rank: its own output files, never back into the driver's loop
            code = 0
            try:
                out = os.open(workdir / f"rank{rank}.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(out, 1)
                os.dup2(out, 2)
                run_rank(case, rank, workdir, args.collective_timeout, args.case_timeout)
            except BaseException as error:  # noqa: BLE001 - the harness itself failed in this rank
                with open(workdir / f"rank{rank}.jsonl", "a") as log:
                    log.write(json.dumps({"event": "harness error", "type": type(error).__name__,
                                          "message": first_line(error)}) + "\n")
                code = 3
            finally:
                os._exit(code)
        pids.append(pid)
    return World(case, workdir, time.time(), pids)


def reap(world: World, block: bool = False):
    for rank, pid in enumerate(world.pids):
        if rank in world.status:
            continue
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                world.status[rank] = f"signal {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                world.status[rank] = f"exit {os.WEXITSTATUS(status)}"


def finish_world(world: World) -> dict:
    ranks = []
    for rank in range(world.case.world):
        path = world.workdir / f"rank{rank}.jsonl"
        events = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a rank killed while writing it
                pass
        out = world.workdir / f"rank{rank}.out"
        tail = out.read_text(errors="replace")[-600:] if out.exists() else ""
        ranks.append({"events": events, "status": world.status[rank], "output_tail": tail})
    shutil.rmtree(world.workdir, ignore_errors=True)
    return {"id": world.case.id, "wall_s": round(time.time() - world.started, 2), "ranks": ranks}


def checkout_state(path: str) -> dict:
    """The commit and the uncommitted changes under crl_ops/ when the driver imported it."""
    def git(*argv):
        try:
            return subprocess.run(["git", "-C", path, *argv], capture_output=True, text=True, check=True).stdout
        except (subprocess.CalledProcessError, FileNotFoundError):
            return ""

    digest = hashlib.sha256()
    for file in sorted(Path(path, "crl_ops").rglob("*")):
        if file.is_file() and file.suffix in (".py", ".h", ".cpp", ".cu", ".so"):
            digest.update(file.name.encode() + file.read_bytes())
    return {"path": path, "commit": git("rev-parse", "--short", "HEAD").strip(),
            "changed": git("status", "--porcelain", "--", "crl_ops").splitlines(),
            "crl_ops_sha256": digest.hexdigest()[:16]}


def driver(args):
    """Runs every case on this checkout, at most --jobs worlds at a time, one JSON line per world."""
    import torch.distributed  # noqa: F401 - imported once here, inherited by every forked rank

    import crl_ops

    here = Path(crl_ops.__file__).resolve().parent.parent
    if here != Path(args.checkout).resolve():
        raise SystemExit(f"crl_ops imported from {here}, not from {args.checkout}")
    state = checkout_state(args.checkout)
    state["native_cpu"] = crl_ops.native_available("cpu")
    print("STATE " + json.dumps(state), flush=True)
    pattern = re.compile(args.cases) if args.cases else None
    pending = [c for c in all_cases() if pattern is None or pattern.search(c.id)]
    scratch = Path(args.scratch)
    running: list[World] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            running.append(start_world(pending.pop(0), scratch, args))
        time.sleep(0.05)
        for world in list(running):
            reap(world)
            ranks = range(world.case.world)
            if not world.released and all(r in world.status or (world.workdir / f"rank{r}.done").exists()
                                          for r in ranks):
                (world.workdir / "release").touch()
                world.released = True
            if len(world.status) < world.case.world and time.time() - world.started > args.case_timeout:
                for rank, pid in enumerate(world.pids):
                    if rank not in world.status:
                        os.kill(pid, signal.SIGKILL)
                reap(world, block=True)
                for rank, status in world.status.items():
                    if status == "signal SIGKILL":
                        world.status[rank] = "killed at the case timeout"
            if len(world.status) == world.case.world:
                running.remove(world)
                print("RESULT " + json.dumps(finish_world(world)), flush=True)


# ---- classification --------------------------------------------------------------------------------------------


@dataclass
class RankStep:
    kind: str  # "returned" | "raised" | "stuck" | "crash"
    event: dict
    text: str


def rank_step(rank: dict, index: int) -> RankStep:
    events = rank["events"]
    for e in events:
        if e.get("step") == index and e["event"] in ("returned", "raised"):
            if e["event"] == "returned":
                return RankStep("returned", e, f"returned {e['loss']!r}")
            text = f"{e['type']}: {e['message']}"
            if e["collective"] in ("timeout", "peer left"):
                return RankStep("stuck", e, f"left waiting in a collective ({e['collective']}: {text[:160]})")
            return RankStep("raised", e, text)
    started = any(e["event"] == "start" and e["step"] == index for e in events)
    status = rank["status"]
    harness = [e for e in events if e["event"] == "harness error"]
    if harness:
        return RankStep("crash", harness[0], f"harness error {harness[0]['type']}: {harness[0]['message']}")
    if status.startswith("signal"):
        return RankStep("crash", {}, f"died of {status.split()[1]}" + ("" if started else " before this step")
                        + f" ({last_words(rank['output_tail'])})")
    if status.startswith("killed"):
        where = "in this step" if started else (
            "before this step" if any(e["event"] == "joined" for e in events) else "before joining the group")
        return RankStep("stuck", {}, f"still waiting at the case timeout ({where})")
    return RankStep("crash", {}, f"{status} without finishing this step")


def last_words(output: str) -> str:
    """Why a process died, from the end of its output: the exception C++ terminated with, if any."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reasons = [line for line in lines if "what()" in line or "terminate called" in line or "Error" in line]
    return (reasons[-1] if reasons else lines[-1] if lines else "no output")[:240]


def error_is_clear(state: RankStep, words: tuple) -> Optional[str]:
    """None if the error is a TypeError/ValueError whose message matches every word, else why not."""
    e = state.event
    if e.get("type") not in ("ValueError", "TypeError"):
        return f"{e.get('type')} rather than a ValueError/TypeError"
    missing = [w for w in words if not re.search(w, e["message"], re.I)]
    return f"the message does not name {missing}" if missing else None


def loss_close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= LOSS_TOLERANCE * (1 + abs(b))


def classify_step(case: dict, states: list[RankStep], single: dict, expectation: str) -> tuple[str, str]:
    """(outcome, what happened) of one step from every rank's state in it."""
    words = tuple(case["words"])
    by_kind = defaultdict(list)
    for rank, s in enumerate(states):
        by_kind[s.kind].append(rank)
    crashed, raised, stuck, returned = (by_kind[k] for k in ("crash", "raised", "stuck", "returned"))
    if crashed:
        return "crash", f"rank(s) {crashed}: {states[crashed[0]].text}"
    if not raised and not returned:
        return "hang", f"every rank left waiting: {states[0].text}"
    if raised and (stuck or returned):
        unclear = [r for r in raised if error_is_clear(states[r], words if expectation != "as one process" else ())]
        others = "; ".join(f"rank {r} {states[r].text[:120]}" for r in stuck + returned)
        outcome = "unclear error" if unclear else "clear error on some ranks only"
        return outcome, f"rank(s) {raised} raised `{states[raised[0]].text[:200]}`; {others}"
    if stuck:
        return "hang", (f"rank(s) {stuck} {states[stuck[0]].text[:160]}, while rank(s) {returned} returned "
                        f"{[states[r].event['loss'] for r in returned]}")
    if raised:  # every rank raised an error of its own in this step
        if expectation == "as one process":
            if "error" not in single:
                return "unclear error", f"every rank raised where one process returns: `{states[0].text[:200]}`"
            wrong = [r for r in raised if states[r].event["type"] != single["error"] or (
                states[r].event["message"] != single["message"] and error_is_clear(states[r], words))]
            if wrong:
                return "unclear error", (f"rank(s) {wrong} raised `{states[wrong[0]].text[:200]}` where one process "
                                         f"raises `{single['error']}: {single['message'][:160]}`")
            return "ok", f"every rank raised `{states[0].text[:200]}`"
        unclear = {r: error_is_clear(states[r], words) for r in raised}
        unclear = {r: why for r, why in unclear.items() if why}
        if unclear:
            r = min(unclear)
            return "unclear error", f"rank {r}: {unclear[r]}: `{states[r].text[:200]}`"
        return "ok", f"every rank raised `{states[0].text[:200]}`"
    losses = [states[r].event["loss"] for r in returned]
    agree = all(loss_close(x, losses[0]) for x in losses)
    spread = "the same loss on every rank" if agree else "different losses on the ranks"
    if expectation == "raises":
        return "wrong answer", f"accepted silently: {spread} {losses}"
    if "error" in single:
        return "wrong answer", (f"accepted silently where one process raises `{single['message'][:120]}`: "
                                f"{spread} {losses}")
    if not agree:
        return "wrong answer", f"{spread}: {losses}, one process {single['loss']!r}"
    off = [r for r in returned if states[r].event.get("loss_error") is None
           or not loss_close(states[r].event["loss"], single["loss"])]
    if off:
        return "wrong answer", f"every rank returns {losses[0]!r} but one process gives {single['loss']!r}"
    bad_grads = [r for r in returned if states[r].event.get("grad_problem")]
    if bad_grads:
        return "wrong answer", (f"the loss is right, but rank {bad_grads[0]}'s gradient is not W times one process's: "
                                f"{states[bad_grads[0]].event['grad_problem'][:200]}")
    return "ok", f"every rank returns the single-process loss {losses[0]!r}" + (
        " (NaN, and NaN gradients)" if math.isnan(losses[0]) else "")


def classify(case: dict, record: dict) -> dict:
    """The case's outcome: that of its first step that is not ok (each step's too)."""
    ranks = record["ranks"]
    single_steps = next((e["steps"] for r in ranks for e in r["events"] if e["event"] == "one process"), None)
    if single_steps is None:
        states = [rank_step(r, 0) for r in ranks]
        return {"outcome": "crash", "detail": "no rank got as far as its first step: " + states[0].text,
                "steps": [], "ranks": [s.text for s in states], "wall_s": record["wall_s"]}
    steps, first_bad = [], None
    for index, single in enumerate(single_steps):
        name = ("adversarial step" if index == len(single_steps) - 2 else
                "next good step" if index == len(single_steps) - 1 else "first step")
        states = [rank_step(r, index) for r in ranks]
        expectation = case["expect"] if name == "adversarial step" else "as one process"
        outcome, detail = classify_step(case, states, single, "either" if expectation == "trusted" else expectation)
        steps.append({"step": name, "outcome": outcome, "detail": detail, "ranks": [s.text for s in states]})
        if outcome != "ok" and first_bad is None:
            first_bad = steps[-1]
    shown = first_bad or next(s for s in steps if s["step"] == "adversarial step")
    adversarial = next(s for s in steps if s["step"] == "adversarial step")
    return {"outcome": shown["outcome"], "where": shown["step"], "detail": shown["detail"],
            "next_step": steps[-1]["outcome"], "ranks": adversarial["ranks"], "steps": steps,
            "wall_s": record["wall_s"]}


# ---- the parent -------------------------------------------------------------------------------------------------


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        model = fields.get("Model name", "").strip()
        cores = int(fields.get("Core(s) per socket", "0")) * int(fields.get("Socket(s)", "1") or 1)
        return f"{model}, {cores} cores ({fields.get('CPU(s)', '?').strip()} CPUs), torch {torch.__version__}"
    except (OSError, subprocess.CalledProcessError, ValueError):
        return f"{os.cpu_count()} CPUs, torch {torch.__version__}"


def case_summary(case: Case) -> dict:
    return {"area": case.area, "name": case.name, "backend": case.backend, "world": case.world,
            "expect": case.expect, "words": list(case.words), "note": case.note}


def run_driver(label: str, checkout: str, args, scratch: Path, on_result) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout, PYTHONDONTWRITEBYTECODE="1")
    env.pop("CRL_OPS_LIBRARY", None)
    argv = [sys.executable, str(Path(__file__).resolve()), "--driver", "--checkout", checkout,
            "--scratch", str(scratch / label), "--jobs", str(args.jobs), "--case-timeout", str(args.case_timeout),
            "--collective-timeout", str(args.collective_timeout)] + (["--cases", args.cases] if args.cases else [])
    stderr_path = scratch / f"{label}-driver.err"
    state, records = {}, {}
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                   cwd=tempfile.gettempdir())
        for line in process.stdout:
            if line.startswith("STATE "):
                state = json.loads(line[6:])
            elif line.startswith("RESULT "):
                record = json.loads(line[7:])
                records[record["id"]] = record
                on_result()
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"the {label} driver failed ({process.returncode}): "
                           f"{stderr_path.read_text(errors='replace')[-3000:]}")
    return {"state": state, "records": records}


def parent(args):
    from tqdm import tqdm

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="crl-adversarial-distributed-"))
    pattern = re.compile(args.cases) if args.cases else None
    cases = [c for c in all_cases() if pattern is None or pattern.search(c.id)]
    checkouts = {"before": args.before, "after": args.after}
    progress = tqdm(total=len(cases) * len(checkouts), desc="cases", unit="case", mininterval=5)
    lock = threading.Lock()

    def advance():
        with lock:
            progress.update(1)

    results, failures = {}, []

    def run(label):
        try:
            results[label] = run_driver(label, checkouts[label], args, scratch, advance)
        except Exception as error:  # noqa: BLE001 - reported after the other driver stops
            failures.append(error)

    threads = [threading.Thread(target=run, args=(label,)) for label in checkouts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.close()
    if failures:
        raise failures[0]
    rows = []
    for case in cases:
        row = case_summary(case)
        for label in checkouts:
            row[label] = classify(row, results[label]["records"][case.id])
        rows.append(row)
    meta = {
        "issue": "#22, the adversarial pass of distributed=True on gloo CPU ranks",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(),
        "before": results["before"]["state"],
        "after": results["after"]["state"],
        "case_timeout_s": args.case_timeout,
        "collective_timeout_s": args.collective_timeout,
        "jobs": args.jobs,
        "wall_s": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(
        '{"meta": ' + json.dumps(meta, indent=1) + ',\n"cases": [\n'
        + ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows) + "\n]}\n")
    write_report(out, meta, rows)
    shutil.rmtree(scratch)
    print(f"wrote {out}/results.json and results.md in {meta['wall_s']} s")


# ---- the report ---------------------------------------------------------------------------------------------------


def describe_state(state: dict) -> str:
    changed = state.get("changed") or []
    text = f"`{state.get('path')}` at {state.get('commit')}"
    if changed:
        text += " with uncommitted changes to " + ", ".join(f"`{c.split()[-1]}`" for c in changed)
    return text + f" (crl_ops sources digest {state.get('crl_ops_sha256')})"


def cell(result: dict) -> str:
    where = "" if result.get("where") in (None, "adversarial step") else f" ({result['where']})"
    return f"{result['outcome']}{where}; next: {result['next_step']}"


def cells(runs: list, label: str) -> str:
    """One cell for a case's runs: their common outcome, or each backend's."""
    texts = {r["backend"]: cell(r[label]) for r in runs}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "<br>".join(f"{backend}: {text}" for backend, text in texts.items())


def group_by_case(rows: list, label: str) -> list:
    """[(backends, first run)] of runs of one case that end the same way."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["name"], r[label]["outcome"], r[label]["where"], r[label]["next_step"])].append(r)
    return [([r["backend"] for r in runs], runs[0]) for runs in groups.values()]


def write_report(out: Path, meta: dict, rows: list):
    lines = [
        "# Issue #22: the adversarial pass of `distributed=True` (gloo CPU ranks), before and after",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- Machine: {meta['machine']}; wall time {meta['wall_s']} s for both checkouts "
        f"({meta['jobs']} worlds at a time per checkout, the two checkouts side by side).",
        f"- BEFORE: {describe_state(meta['before'])}.",
        f"- AFTER: {describe_state(meta['after'])}, as imported when the run started.",
        f"- Bounds: gloo collective timeout {meta['collective_timeout_s']} s "
        f"(`init_process_group(timeout=...)`), each world killed after {meta['case_timeout_s']} s.",
        "",
        "Each case is a world of 2 (or 3) gloo ranks, fresh processes forked from a driver that imported",
        "the checkout's crl_ops, on float64 batches, with each backend (reference, native) unless named.",
        "The odd rank (the last unless named) differs at the adversarial step; a first good step",
        "precedes it in some cases, and a good step on every rank (rank 0's options) always follows it.",
        "Each rank compares its loss (1e-12) and gradients (W times its rows of one process's, 1e-10)",
        "with one process on the concatenated batch. A case's outcome is that of its first step that is",
        "not ok (`where`). Outcomes: **ok** (every rank raises a clear ValueError/TypeError in the same",
        "step, or every rank returns the single-process loss and gradients, as documented), **clear",
        "error on some ranks only** (another rank hangs or returns), **wrong answer**, **hang** (left",
        "waiting until the collective timeout or the case timeout), **crash** (a signal), **unclear",
        "error**. Expected results:",
        "",
    ]
    lines += [f"- `{key}`: {text}" for key, text in EXPECTATIONS.items()]
    lines += ["", "## Per area", "", "A run is one case on one backend.", "",
              "| area | runs | ok BEFORE | ok AFTER | next good step ok BEFORE | next good step ok AFTER |",
              "|---|---|---|---|---|---|"]
    for area, title in AREAS.items():
        mine = [r for r in rows if r["area"] == area]
        if not mine:
            continue
        count = lambda label, key: sum(1 for r in mine if r[label][key] == "ok")  # noqa: E731
        lines.append(f"| {title} | {len(mine)} | {count('before', 'outcome')} | {count('after', 'outcome')} | "
                     f"{count('before', 'next_step')} | {count('after', 'next_step')} |")
    lines.append(f"| **all** | {len(rows)} | {sum(r['before']['outcome'] == 'ok' for r in rows)} | "
                 f"{sum(r['after']['outcome'] == 'ok' for r in rows)} | "
                 f"{sum(r['before']['next_step'] == 'ok' for r in rows)} | "
                 f"{sum(r['after']['next_step'] == 'ok' for r in rows)} |")
    lines += ["", "Outcomes per area:", "", "| area | checkout | " + " | ".join(OUTCOMES) + " |",
              "|---|---|" + "---|" * len(OUTCOMES)]
    for area, title in AREAS.items():
        mine = [r for r in rows if r["area"] == area]
        for label in ("before", "after"):
            if mine:
                counts = Counter(r[label]["outcome"] for r in mine)
                lines.append(f"| {title} | {label.upper()} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    bad = [r for r in rows if r["after"]["outcome"] != "ok" or r["after"]["next_step"] != "ok"]
    lines += ["", f"## AFTER runs that are not ok ({len(bad)} runs)", "",
              "Runs of one case on both backends are shown once where they end the same way. The ranks' states",
              "are those of the adversarial step (first lines of their errors; results.json has them whole).", ""]
    if not bad:
        lines.append("None.")
    for area, title in AREAS.items():
        groups = group_by_case([r for r in bad if r["area"] == area], "after")
        if not groups:
            continue
        lines += [f"### {title}", ""]
        for backends, r in groups:
            after = r["after"]
            note = f" *Note: {r['note']}.*" if r["note"] else ""
            ranks = "; ".join(f"rank {i}: {text[:220]}" for i, text in enumerate(after["ranks"]))
            nxt = "" if after["next_step"] == "ok" else f" Next good step: **{after['next_step']}**."
            lines.append(f"- **{after['outcome']}** ({after['where']}) {r['name']} [{', '.join(backends)}; "
                         f"W={r['world']}; expected `{r['expect']}`]: {after['detail'][:500]}. Ranks: {ranks}.{nxt}"
                         f"{note}")
        lines.append("")
    lines += ["## What changed", "", "| BEFORE | AFTER | runs | cases |", "|---|---|---|---|"]
    transitions = defaultdict(list)
    for r in rows:
        if r["before"]["outcome"] != r["after"]["outcome"]:
            transitions[(r["before"]["outcome"], r["after"]["outcome"])].append(r)
    for (was, now), runs in sorted(transitions.items(), key=lambda item: -len(item[1])):
        names = sorted({r["name"] for r in runs})
        lines.append(f"| {was} | {now} | {len(runs)} | {'; '.join(names)} |")
    lines += ["", "## Every case", "",
              "Outcome (and the step where it happens, when not the adversarial one); `next`: the good step after",
              "it. One cell for both backends where they agree.", ""]
    for area, title in AREAS.items():
        mine = [r for r in rows if r["area"] == area]
        if not mine:
            continue
        lines += [f"### {title}", "", "| case | W | expected | BEFORE | AFTER |", "|---|---|---|---|---|"]
        by_name = defaultdict(list)
        for r in mine:
            by_name[r["name"]].append(r)
        for name, runs in by_name.items():
            lines.append(f"| {name} | {runs[0]['world']} | {runs[0]['expect']} | {cells(runs, 'before')} | "
                         f"{cells(runs, 'after')} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="/work/base-d2efe17", help="checkout before the fixes (kernels built)")
    parser.add_argument("--after", default="/work/main", help="checkout with the fixes (kernels built)")
    parser.add_argument("--out", default="benchmarks/results/2026-12-07-cpu-adversarial-distributed")
    parser.add_argument("--case-timeout", type=float, default=60.0, help="seconds before a world is killed (hang)")
    parser.add_argument("--collective-timeout", type=float, default=10.0,
                        help="the process group's timeout: a rank left waiting in a collective raises after it")
    parser.add_argument("--jobs", type=int, default=2, help="worlds at a time per checkout")
    parser.add_argument("--cases", help="only the cases whose id (area/name/backend) matches this regex")
    parser.add_argument("--report", action="store_true", help="only rewrite results.md from results.json")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collective_timeout >= args.case_timeout:
        parser.error("--collective-timeout must be shorter than --case-timeout")
    if args.driver:
        driver(args)
    elif args.report:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        write_report(Path(args.out), saved["meta"], saved["cases"])
    else:
        parent(args)


if __name__ == "__main__":
    main()
