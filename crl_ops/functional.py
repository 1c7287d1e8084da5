"""The functional core of crl-ops: `class_rectification_loss` is the one implementation of l_crl;
`crl_ops.CRL` and `crl_ops.BalancedLoss` are thin modules over it. Also `mine`,
`profile_minority` and `cross_entropy`, in the same input formats.

Section numbers refer to docs/semantics.md, which defines everything computed here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _backends, reference
from ._inputs import (
    BATCH_SIZES,
    DISTANCES,
    FORMS,
    MODES,
    REDUCTIONS,
    Batch,
    LogitsLike,
    MarginLike,
    accumulation_dtype,
    cached_tensor,
    check_bins,
    check_bool,
    check_choice,
    check_float,
    check_k,
    check_margin,
    check_threshold,
    normalise,
    normalise_labels,
    num_classes_tensor,
)

# The arguments every CRL entry point shares, documented once.
INPUTS_DOC = """\
    features: [B, A, D] per attribute, or [B, D] shared by all attributes; float16, bfloat16,
        float32 or float64. Gradients flow back to them in their own dtype.
    logits: a list of A tensors [B, C_j]; [B, A, C]; [B, A] with one logit z per binary attribute
        (class logits [0, z]); or [B, C] for one attribute with labels [B].
    labels: integer [B, A], or [B] for one attribute; -1 marks an unannotated entry."""

OPTIONS_DOC = """\
    mode: "class" mines by class probability, "instance" by feature distance (section 2).
    form: "relative" (triplet hinge, Eq. 9), "absolute" (contrastive, Eq. 11) or "distribution"
        (histogram overlap, Eq. 12-14) (section 3).
    k: hard positives and hard negatives mined per anchor, 1 to 1024 (paper: K = 5).
    margin: the triplet margins m_j of the relative form: None for the paper's 2*pi/C_j, one
        float, one float per attribute, or a float tensor [A] or [] (which may require grad).
    apc_margin: the contrastive margin of the absolute form, >= 0.
    bins: the histogram nodes tau of the distribution form, 2 to 100000.
    threshold: rho, the minority threshold: the smallest classes whose counts sum to strictly
        less than threshold * (annotated samples) are the minority (section 1); 0.5 in the paper.
    normalize: measure CRL's distances between L2-normalised features (the cross-entropy and the
        caller's features are unchanged; section 3).
    reduction: "pooled", the paper's mean over all triplets (pairs) of all attributes, or
        "attribute", the mean over attributes of each attribute's mean (section 3).
    distance: "feature" measures distances between the features; "score" is the journal
        version's class-level score space (mode="class", form="relative" only): d(a, p) =
        |p_a(c) - p_p(c)| and d(a, n) = p_a(c) - p_n(c) on the anchor's class c, so that CRL's
        gradient reaches the logits and `features` is only checked (section 3).
    backend: "auto" uses the compiled kernels where they can run (building them once if need
        be, with a warning if it falls back), "native" insists on them, "reference" is the
        pure-PyTorch implementation.
    validate: True checks label ranges and finite values inside the ops, without a host
        synchronisation: ValueError on the CPU, a device-side assertion on CUDA. False skips the
        checks: a label outside -1..C_j-1 counts as not annotated, and non-finite values give a
        NaN loss and NaN gradients (section 6).
    distributed: mine over the global batch of all ranks of the default process group
        (crl_ops.distributed, docs/scaling.md).
    batch_sizes: with distributed=True, "gathered" learns every rank's batch size each step (one
        small all-gather read on the host: a host synchronisation; sizes may differ); "equal"
        declares that every rank passes the same batch size at each step (as with
        DistributedSampler), checked on the first step and when this rank's size changes, with
        no host synchronisation otherwise (docs/scaling.md)."""

RAISES_DOC = """\
    TypeError, ValueError: an argument of the wrong type, shape, dtype, device or value; the
        message names the argument and what was expected.
    RuntimeError: backend="native" where the kernels cannot be had (the message says why)."""


class Mined(NamedTuple):
    """Fixed-shape mining result (semantics section 2); -1 marks an empty slot."""

    anchors: Tensor  # [B, A] bool
    positives: Tensor  # [B, A, K] int64
    negatives: Tensor  # [B, A, K] int64


@dataclass(frozen=True)
class BatchStats:
    """What CRL saw in one batch, per attribute (tensors on the batch's device; no host sync until read).

    counts [A, Cmax] annotated samples per class; minority and active [A, Cmax] the minority
    classes (section 1) and those with at least two samples; pair_counts [A, 4] the numbers of
    anchors, positive pairs, negative pairs and triplets.
    """

    counts: Tensor
    minority: Tensor
    active: Tensor
    pair_counts: Tensor

    @property
    def num_anchors(self) -> Tensor:
        return self.pair_counts[:, 0]

    @property
    def num_positive_pairs(self) -> Tensor:
        return self.pair_counts[:, 1]

    @property
    def num_negative_pairs(self) -> Tensor:
        return self.pair_counts[:, 2]

    @property
    def num_triplets(self) -> Tensor:
        return self.pair_counts[:, 3]

    def summary(self) -> dict:
        """Plain Python numbers for a logger (one host synchronisation)."""
        totals = self.pair_counts.sum(0).tolist()
        return {
            "minority_classes": [row.nonzero().flatten().tolist() for row in self.minority.cpu()],
            "anchors": totals[0],
            "positive_pairs": totals[1],
            "negative_pairs": totals[2],
            "triplets": totals[3],
        }


@dataclass(frozen=True)
class Options:
    """CRL's settings but the margin (a tensor margin may be a module's parameter), checked once: a
    module keeps them; the functional form checks each call."""

    mode: str = "instance"
    form: str = "relative"
    k: int = 5
    apc_margin: float = 1.0
    bins: int = 100
    threshold: float = 0.5
    normalize: bool = False
    reduction: str = "pooled"
    distance: str = "feature"
    backend: str = "auto"
    validate: bool = True
    distributed: bool = False
    batch_sizes: str = "gathered"

    @staticmethod
    def checked(mode="instance", form="relative", k=5, apc_margin=1.0, bins=100, threshold=0.5,
                normalize=False, reduction="pooled", distance="feature", backend="auto", validate=True,
                distributed=False, batch_sizes="gathered") -> "Options":
        if distance == "score" and (mode, form) != ("class", "relative"):
            raise ValueError(f'distance="score" is defined for mode="class" with form="relative" (the journal '
                             f"version's class-level triplets), got mode={mode!r}, form={form!r}")
        return Options(
            mode=check_choice("mode", mode, MODES), form=check_choice("form", form, FORMS), k=check_k(k),
            apc_margin=check_float("apc_margin", apc_margin, minimum=0.0),
            bins=check_bins(bins), threshold=check_threshold(threshold), normalize=check_bool("normalize", normalize),
            reduction=check_choice("reduction", reduction, REDUCTIONS),
            distance=check_choice("distance", distance, DISTANCES), backend=_backends.check_backend(backend),
            validate=check_bool("validate", validate), distributed=check_bool("distributed", distributed),
            batch_sizes=check_choice("batch_sizes", batch_sizes, BATCH_SIZES),
        )


def margins_tensor(margin: MarginLike, num_classes: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-attribute triplet margins m_j [A]: 2*pi/C_j by default (paper Eq. 10)."""
    num_attributes = len(num_classes)
    if isinstance(margin, Tensor):
        if margin.dim() == 1 and margin.shape[0] != num_attributes:
            raise ValueError(f"margin tensor must have shape [A={num_attributes}] or [], got {list(margin.shape)}")
        if margin.device != device:
            raise ValueError(f"margin tensor must be on the features' device {device}, got {margin.device}")
        margin = margin if margin.dtype == dtype else margin.to(dtype)
        return margin if margin.dim() == 1 else margin.expand(num_attributes)
    if margin is None:
        values = tuple(2 * math.pi / c for c in num_classes)
    elif isinstance(margin, float):
        values = (margin,) * num_attributes
    else:
        if len(margin) != num_attributes:
            raise ValueError(f"margin has {len(margin)} values but the batch has A={num_attributes} attributes")
        values = tuple(margin)
    return cached_tensor(values, dtype, device)


def crl_features(options: Options, batch: Batch) -> Tensor:
    """The vectors CRL measures feature distances between (section 3), normalised if asked."""
    features = batch.features
    if not options.normalize:
        return features
    if features.shape[1] > 1 and features.stride(1) == 0:  # [B, D] shared by the attributes: once
        return _normalized(features[:, 0])[:, None].expand_as(features)
    return _normalized(features)


def _normalized(x: Tensor) -> Tensor:
    """x / max(||x||, 1e-12) along the last dim. Vectors with an entry above 1e15 are first divided
    by their largest entry (no gradient through it: the result does not depend on it), so that the
    norm does not overflow; all others are exactly torch.nn.functional.normalize's."""
    largest = x.detach().abs().amax(-1, keepdim=True)
    return torch.nn.functional.normalize(x / torch.where(largest > 1e15, largest, 1.0), dim=-1)


def _crl(options: Options, margin: MarginLike, batch: Batch, caller: str = "CRL") -> tuple[Tensor, BatchStats]:
    """l_crl of a normalised batch, and its statistics: this process's, or with options.distributed
    the global batch's (crl_ops.distributed; `caller` names what the ranks must agree on besides,
    such as BalancedLoss's weights and its cross-entropy's collective)."""
    if options.distributed:
        from . import distributed

        return distributed.class_rectification_loss(options, margin, batch, caller)
    if options.distance == "score":
        return _score_space_crl(options, margin, batch)
    features = crl_features(options, batch)
    backend = _backends.resolve(options.backend, features.device, features)
    margins = margins_tensor(margin, batch.num_classes, accumulation_dtype(features.dtype), features.device)
    loss, counts, minority, active, _, _, pair_counts = backend.crl_loss(
        features, batch.logits, batch.labels, batch.classes_tensor(), margins, options.mode, options.form, options.k,
        options.apc_margin, options.bins, options.threshold, options.reduction, options.validate)
    return loss, BatchStats(counts, minority, active, pair_counts)


def _score_space_crl(options: Options, margin: MarginLike, batch: Batch) -> tuple[Tensor, BatchStats]:
    """The journal version's class-level triplets in score space (section 3): the backend mines,
    and the hinges of the probability differences are differentiable torch operations."""
    num_classes = batch.classes_tensor()
    finite = reference.check_finite(batch.features, batch.logits, num_classes, options.validate)
    backend = _backends.resolve(options.backend, batch.logits.device, batch.logits)
    counts, minority, active = backend.profile(batch.labels, num_classes, batch.max_classes, options.threshold,
                                               options.validate)
    anchors, partners = backend.mine_class(batch.logits, batch.labels, num_classes, active, options.k, 0,
                                           batch.labels.shape[0], options.validate)
    scores = reference.class_scores(batch.logits, num_classes)
    margins = margins_tensor(margin, batch.num_classes, scores.dtype, scores.device)
    d = reference.score_distances(scores, reference.check_labels(batch.labels, num_classes, False), partners)
    loss = reference.reduce_sums("relative", reference.relative_sums(d, partners, margins), options.reduction)
    if not options.validate:
        loss = reference.poison(loss, batch.logits, finite)
    return loss, BatchStats(counts, minority, active, reference.pair_counts(anchors, partners))


def class_rectification_loss(features: Tensor, logits: LogitsLike, labels: Tensor, *, mode: str = "instance",
                             form: str = "relative", k: int = 5, margin: MarginLike = None, apc_margin: float = 1.0,
                             bins: int = 100, threshold: float = 0.5, normalize: bool = False,
                             reduction: str = "pooled", distance: str = "feature", backend: str = "auto",
                             validate: bool = True, distributed: bool = False, batch_sizes: str = "gathered",
                             return_stats: bool = False):
    options = Options.checked(mode, form, k, apc_margin, bins, threshold, normalize, reduction, distance, backend,
                              validate, distributed, batch_sizes)
    loss, stats = _crl(options, check_margin(margin), normalise(features, logits, labels, empty_ok=distributed))
    return (loss, stats) if check_bool("return_stats", return_stats) else loss


class_rectification_loss.__doc__ = f"""The Class Rectification Loss l_crl of one batch (docs/semantics.md, sections 1-3).

Profiles the minority classes of each attribute, mines hard positives and negatives for their
samples, and applies the chosen loss form to the mined pairs. Add it to your cross-entropy
(or use `crl_ops.BalancedLoss`).

Args:
{INPUTS_DOC}
{OPTIONS_DOC}
    return_stats: also return the batch's `BatchStats`.

Returns:
    The scalar loss in float32 (float64 for float64 features), part of the autograd graph; a
    batch with nothing to mine gives a zero that still backpropagates. With return_stats,
    (loss, BatchStats).

Raises:
{RAISES_DOC}
"""


def _cross_entropy(batch: Batch) -> Tensor:
    """Section 4 on a normalised batch: -(1/B) sum over annotated entries of log p(label).
    (The global batch's under distributed=True: crl_ops.distributed.cross_entropy.)"""
    num_classes = batch.classes_tensor()
    log_p = torch.log_softmax(reference.class_logits(batch.logits, num_classes), dim=-1)
    annotated = reference.is_annotated(batch.labels, num_classes)
    picked = log_p.gather(-1, torch.where(annotated, batch.labels, 0)[..., None]).squeeze(-1)
    return -torch.where(annotated, picked, 0.0).sum() / batch.labels.shape[0]


def cross_entropy(logits: LogitsLike, labels: Tensor, validate: bool = True) -> Tensor:
    """The cross-entropy of semantics section 4, in CRL's input formats.

    Args:
        logits: as for `class_rectification_loss`.
        labels: integer [B, A] or [B]; -1 = not annotated.
        validate: raise for a label outside -1..C_j-1 (else it counts as not annotated).

    Returns:
        -(1/B) sum_i sum_{j annotated} log p_i(label_ij), in float32 (float64 for float64 logits).

    Raises:
        TypeError, ValueError: a bad argument (the message names it).
    """
    batch = normalise(None, logits, labels, with_features=False)
    reference.check_labels(batch.labels, batch.classes_tensor(), check_bool("validate", validate))
    return _cross_entropy(batch)


def profile_minority(labels: Tensor, num_classes: Union[int, Sequence[int]], threshold: float = 0.5,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The minority classes of each attribute in a label batch (semantics section 1).

    Args:
        labels: integer [B, A] or [B]; -1 = not annotated.
        num_classes: C_j: one int for every attribute, or one per attribute (each >= 2).
        threshold: rho (see `class_rectification_loss`).
        backend: "auto", "native" or "reference".

    Returns:
        (counts [A, Cmax] int64, active [A, Cmax] bool): annotated samples per class, and the
        minority classes with at least two samples (those CRL mines).

    Raises:
        TypeError, ValueError: a bad argument, or a label outside -1..C_j-1.
    """
    labels, num_classes = normalise_labels(labels, num_classes)
    threshold = check_threshold(threshold)
    backend = _backends.resolve(_backends.check_backend(backend), labels.device)
    counts, _, active = backend.profile(labels, num_classes_tensor(num_classes, labels.device), max(num_classes),
                                        threshold, True)
    return counts, active


def mine(features: Tensor, logits: LogitsLike, labels: Tensor, mode: str = "instance", k: int = 5,
         threshold: float = 0.5, normalize: bool = False, backend: str = "auto", validate: bool = True) -> Mined:
    """The hard positives and negatives of every minority-class anchor (semantics sections 1-2):
    what `class_rectification_loss` with the same arguments mines.

    Args:
        features, logits, labels, mode, k, threshold, normalize, backend, validate: as for
            `class_rectification_loss`.

    Returns:
        `Mined(anchors [B, A] bool, positives [B, A, K], negatives [B, A, K])`: sample indices,
        -1 where empty; a non-anchor's rows are all -1.

    Raises:
        TypeError, ValueError: a bad argument or, with validate, a bad value.
    """
    options = Options.checked(mode, k=k, threshold=threshold, normalize=normalize, backend=backend,
                              validate=validate)
    batch = normalise(features, logits, labels)
    vectors = crl_features(options, batch).detach()
    backend = _backends.resolve(options.backend, vectors.device)
    num_classes = batch.classes_tensor()
    _, _, active = backend.profile(batch.labels, num_classes, batch.max_classes, options.threshold, validate)
    rows = batch.labels.shape[0]
    if options.mode == "class":
        anchors, partners = backend.mine_class(batch.logits, batch.labels, num_classes, active, k, 0, rows, validate)
    else:
        anchors, partners = backend.mine_instance(vectors, batch.logits, batch.labels, num_classes, active, k, 0,
                                                  rows, validate)
    return Mined(anchors, partners[..., :k], partners[..., k:])
