"""Global-batch CRL under torch.distributed, sharded by anchor (docs/scaling.md).

With per-GPU batches of a few dozen samples, a per-GPU minority profile sees almost no minority
samples, so `distributed=True` profiles and mines over the samples of all ranks of the default
process group. The result equals one process on the concatenated batch (ranks in order, uneven
batch sizes allowed), but each rank only does its share of the work:

- forward: one all-gather of every rank's CRL vectors (features or normalised features; with
  distance="score" the logits themselves, which then carry the gradient), labels and, for
  instance mining or validate=True, logits, packed as bytes; every rank profiles the global
  batch (cheap), then mines only its own anchors against the candidates of all ranks (class
  mode: one more all-gather, of the class lists of each rank's own rows, merged) and reduces its
  anchors' pairs to per-attribute sums (backend.pair_distances, backend.pair_sums) and counts;
  one all-reduce of those small vectors gives the global loss and statistics on every rank. The
  histogram form all-reduces each attribute's longest distance R (a max) before its histograms.
  Ranks with fewer samples pad to the largest batch: padded rows are unannotated (label -1),
  which no profile, anchor or candidate counts.
- backward: the gradient of the gathered CRL vectors goes back to the ranks that own them with one
  reduce-scatter. A tensor margin is replicated: its gradient is all-reduced.
- `cross_entropy`: each rank sums its own samples; one all-reduce of (sum, batch size).

Gradient convention. Every rank returns the same global loss L. A rank's own features and logits
receive W * dL/d(its rows) (W ranks): DDP averages parameter gradients over the ranks, which turns
this into exactly the parameter gradient of one process on the concatenated batch. (Without DDP,
average the ranks' gradients.) A margin tensor gets dL/dm itself, the same on every rank.

Batch sizes (`options.batch_sizes`). "gathered": every step all-gathers each rank's batch size
with a checksum of its input layout and CRL options, read on the host (one host synchronisation
per step), so sizes may differ from step to step. "equal": the user declares that every rank
passes the same batch size at each step (DistributedSampler gives every rank the same number of
samples, the last batch included); the sizes and layouts are gathered and checked on the first
step and again whenever this rank's batch size or layout changes, and otherwise taken as known:
no collective and no host synchronisation. Like DDP, which checks parameter shapes across ranks
once, it then trusts the declaration: a rank whose size changes alone makes the collectives
disagree.

Value checks (validate=True) run on tensors every rank holds the same copy of (the gathered
labels, features and logits, the all-reduced overflow flag), so every rank raises the same error
at the same point and none is left waiting in a collective.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

from . import _backends, reference
from ._inputs import Batch

# torch 2.14 renamed the collectives (the old names warn); torch 2.4 has the old ones.
_ALL_GATHER = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_REDUCE_SCATTER = getattr(fc, "reduce_scatter_single", None) or fc.reduce_scatter_tensor
_ALL_GATHER_INTO = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_INTO = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def check_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) (torchrun sets up its environment) before the "
            "first forward, or pass distributed=False"
        )


def _group():
    return dist.group.WORLD


# Every collective of this module goes through these three (tools/ddp_scaling.py times them).
# Eagerly they write into preallocated outputs (on gloo a third of the functional collectives'
# cost); under torch.compile they are functional collectives, which trace into the graph.


def _all_gather(tensor: Tensor) -> Tensor:
    """[W * n, ...]: every rank's [n, ...] tensor, in rank order."""
    tensor = tensor.contiguous()
    if torch.compiler.is_compiling():
        return fc.wait_tensor(_ALL_GATHER(tensor, 0, _group()))
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    _ALL_GATHER_INTO(out, tensor)
    return out


def _reduce_scatter(tensor: Tensor) -> Tensor:
    """This rank's [n, ...] block of the sum over the ranks of their [W * n, ...] tensors."""
    tensor = tensor.contiguous()
    if torch.compiler.is_compiling():
        return fc.wait_tensor(_REDUCE_SCATTER(tensor, "sum", 0, _group()))
    out = tensor.new_empty((tensor.shape[0] // dist.get_world_size(), *tensor.shape[1:]))
    _REDUCE_SCATTER_INTO(out, tensor)
    return out


def _all_reduce(tensor: Tensor, op: str) -> Tensor:
    if torch.compiler.is_compiling():
        return fc.wait_tensor(fc.all_reduce(tensor.contiguous(), op, _group()))
    out = tensor.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
    dist.all_reduce(out, op=_REDUCE_OPS[op])
    return out


def _shares_features(features: Tensor) -> bool:
    """[B, D] features expanded to [B, A, D]: gather the [B, 1, D] view, not A copies."""
    return features.shape[1] > 1 and features.stride(1) == 0


def _layout(options, batch: Batch, vectors: Tensor) -> str:
    """Everything except the batch size that must agree across ranks for the collectives to line up."""
    return (
        f"features [*, {', '.join(map(str, batch.features.shape[1:]))}] {batch.features.dtype}"
        f"{' (shared by all attributes)' if _shares_features(batch.features) else ''}, "
        f"logits {batch.logits.dtype} with classes {batch.num_classes}, CRL vectors {vectors.dtype}, "
        f"options mode={options.mode} form={options.form} k={options.k} bins={options.bins} "
        f"distance={options.distance} normalize={options.normalize} validate={options.validate}"
    )


# ---- batch sizes and the layout check ----------------------------------------------------------------

_VERIFIED: dict = {}  # batch_sizes="equal": layout -> (process group, batch size) checked on every rank


def _gather_sizes(layout: str, batch_size: int, device: torch.device) -> list[int]:
    """Every rank's batch size, from one small all-gather that also checks that the layouts agree."""
    mine = torch.tensor([batch_size, zlib.crc32(layout.encode())], device=device)
    sizes, signatures = zip(*_all_gather(mine).view(-1, 2).tolist())
    differing = [rank for rank, signature in enumerate(signatures) if signature != signatures[0]]
    if differing:
        raise ValueError(
            f"distributed=True: the inputs of rank(s) {differing} differ from rank 0's in feature shape, "
            f"dtype, class counts or CRL options; every rank must pass the same format, only the batch "
            f"size may differ (rank {dist.get_rank()} has {layout})"
        )
    return list(sizes)


@torch.compiler.disable  # host-side: a cache lookup or a collective read on the host (one graph break)
def _rank_sizes(layout: str, batch_size: int, batch_sizes: str, device: torch.device) -> tuple:
    group = _group()
    if batch_sizes == "equal" and _VERIFIED.get(layout) == (group, batch_size):
        return (batch_size,) * dist.get_world_size()
    sizes = _gather_sizes(layout, batch_size, device)
    if batch_sizes == "equal":
        if len(set(sizes)) > 1:
            raise ValueError(f"batch_sizes='equal' but the ranks' batch sizes are {sizes}; pass "
                             "batch_sizes='gathered' where they may differ")
        _VERIFIED[layout] = (group, batch_size)
    return tuple(sizes)


# ---- collectives with the gradients of the convention above -------------------------------------------


def _gather_rows(rows: int, parts: list) -> list:
    """[W * rows, ...] for each (tensor, fill) of `parts` (tensors with this rank's rows first): every
    rank's rows, padded to `rows` per rank with `fill` (rank q's rows start at q * rows), in one
    all-gather of their bytes. The first tensor comes back as a strided view of the gathered buffer
    (the kernels read in place), the others as contiguous copies."""
    own = parts[0][0].shape[0]
    flat = []
    for tensor, fill in parts:
        if own < rows:
            tensor = torch.cat([tensor, tensor.new_full((rows - own, *tensor.shape[1:]), fill)])
        flat.append(tensor.reshape(rows, -1).contiguous().view(torch.uint8))
    widths = [f.shape[1] for f in flat]
    padding = -sum(widths) % 8  # rows of whole 8-byte words: every piece can be viewed in its dtype
    if padding:
        flat.append(flat[0].new_zeros((rows, padding)))
    pieces = _all_gather(torch.cat(flat, dim=1)).split(widths + ([padding] if padding else []), dim=1)
    out = []
    for q, (tensor, _) in enumerate(parts):
        piece = pieces[q] if q == 0 and widths[0] % tensor.element_size() == 0 else pieces[q].contiguous()
        out.append(piece.view(tensor.dtype).view(-1, *tensor.shape[1:]))
    return out


class _GatherRows(torch.autograd.Function):
    """The rows of all ranks, padded, in one all-gather: CRL's vectors, then the tensors that only
    steer the mining (`steering`: (tensor, fill) pairs; no gradient). Backward: the vectors'
    gradient, summed over the ranks by a reduce-scatter, returns to its owner, times W (the
    convention above)."""

    @staticmethod
    def forward(ctx, rows: int, vectors: Tensor, steering: tuple):
        ctx.own, ctx.world = vectors.shape[0], dist.get_world_size()
        gathered = _gather_rows(rows, [(vectors, 0)] + [(t.detach(), fill) for t, fill in steering])
        ctx.mark_non_differentiable(*gathered[1:])
        return tuple(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor, *_):
        return None, _reduce_scatter(grad)[: ctx.own] * ctx.world, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank partial sums. Every rank holds the same dL/d(total), which is
    dL/d(each rank's part): the backward passes it on, times `grad_scale`."""

    @staticmethod
    def forward(ctx, partial: Tensor, grad_scale: int):
        ctx.grad_scale = grad_scale
        return _all_reduce(partial, "sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.grad_scale if ctx.grad_scale != 1 else grad, None


class _Replicated(torch.autograd.Function):
    """Identity on a tensor every rank holds (a margin): the backward sums the ranks' gradients."""

    @staticmethod
    def forward(ctx, value: Tensor):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, "sum")


# ---- the loss ---------------------------------------------------------------------------------------------


def _unpadded(gathered: Tensor, sizes: tuple, rows: int) -> Tensor:
    """The concatenated batch's rows of a padded gathered tensor."""
    if all(size == rows for size in sizes):
        return gathered
    return torch.cat([gathered[q * rows: q * rows + size] for q, size in enumerate(sizes)])


def _global_sums(options, backend, d: Tensor, partners: Tensor, margins: Tensor, pair_counts: Tensor,
                 flags: Tensor):
    """(PairSums, pair_counts [A, 4], any flag set) of the global batch from this rank's anchors.

    The sums of this rank's pairs (backend.pair_sums), its pair counts and flags travel as one
    float64 vector (counts stay exact to 2^53); the histogram form all-reduces each attribute's
    longest distance (a max) first."""
    longest = _all_reduce(reference.longest_distance(d, partners), "max") if options.form == "distribution" else None
    partial = backend.pair_sums(d, partners, margins, longest, options.form, options.apc_margin, options.bins)
    parts = [partial.flatten(), pair_counts.flatten(), flags]
    total = _SumOverRanks.apply(torch.cat([p.double() for p in parts]), 1)
    sums, counts, flags = total.split([p.numel() for p in parts])
    counts = counts.long().view(pair_counts.shape)
    return reference.pair_sums_with_counts(options.form, sums.to(d.dtype).view(partial.shape), counts), counts, \
        (flags > 0).any()


def _merge_class_lists(keys: Tensor, indices: Tensor) -> Tensor:
    """The class lists [A, C, 2K] of the global batch from those of each rank's own rows, keys and
    (global) indices [W, A, C, 2K]: on each side the K best of all ranks' candidates by (key, then
    index), the lowest keys first for positives and the highest for negatives, as one process
    selects them. Empty slots (index -1, key +inf or -inf) sort last.

    One stable sort by key suffices: in rank order, candidates of equal keys already stand in
    index order (a rank's list is ordered by (key, index), and rank q's rows precede rank q+1's)."""
    k = keys.shape[-1] // 2
    sides = []
    for side, descending in ((slice(0, k), False), (slice(k, None), True)):
        key = keys[..., side].permute(1, 2, 0, 3).flatten(2)  # [A, C, W K], rank by rank
        best = torch.sort(key, dim=-1, descending=descending, stable=True).indices[..., :k]
        sides.append(indices[..., side].permute(1, 2, 0, 3).flatten(2).gather(-1, best))
    return torch.cat(sides, dim=-1)


def _mine_class(backend, batch: Batch, num_classes: Tensor, active: Tensor, k: int, first: int):
    """Class-level mining of this rank's rows: each rank selects the class lists of its own rows,
    one all-gather of the lists (a few rows per class), and the merged lists give the anchors'
    partners, as backend.mine_class on the concatenated batch would."""
    keys, lists = backend.class_lists(batch.logits, batch.labels, num_classes, active, k, False)
    lists = torch.where(lists >= 0, lists + first, -1)  # rows of the padded global batch
    all_keys, all_lists = _gather_rows(keys.shape[0], [(keys, 0), (lists, -1)])
    world = dist.get_world_size()
    merged = _merge_class_lists(all_keys.view(world, *keys.shape), all_lists.view(world, *keys.shape))
    return reference.class_rows(merged, reference.check_labels(batch.labels, num_classes, False), active, first)


def class_rectification_loss(options, margin, batch: Batch):
    """l_crl of the global batch on every rank, and its statistics (the entry of crl_ops.functional)."""
    from .functional import BatchStats, crl_features, margins_tensor

    check_process_group()
    score_space = options.distance == "score"  # the journal's class-level triplets: distances between scores
    # The vectors whose gradient returns to their owners: the logits in score space, else CRL's features.
    vectors = batch.logits if score_space else crl_features(options, batch)
    shared = not score_space and _shares_features(vectors)
    own = batch.labels.shape[0]
    sizes = _rank_sizes(_layout(options, batch, vectors), own, options.batch_sizes,
                        batch.labels.device)
    rows = max(sizes)
    first = dist.get_rank() * rows  # this rank's first row in the padded global batch
    num_classes = batch.classes_tensor()

    validate = options.validate
    # The logits of all ranks steer instance mining and are checked with validate; class mining
    # merges the ranks' class lists instead.
    gather_logits = not score_space and (options.mode == "instance" or validate)
    steering = ((batch.labels, -1), (batch.logits, 0)) if gather_logits else ((batch.labels, -1),)
    gathered, labels, *logits = _GatherRows.apply(rows, vectors[:, :1] if shared else vectors, steering)
    logits = gathered.detach() if score_space else (logits[0] if logits else None)

    if validate:  # on the concatenated batch: the messages name its rows, as for one process
        reference.check_labels(_unpadded(labels, sizes, rows), num_classes, True)
    if score_space:
        scores = reference.class_scores(gathered, num_classes)
        reference.check_finite(None, logits, num_classes, validate)
        finite = torch.isfinite(scores).all()
    elif validate:  # every rank checks the same gathered values and raises the same error
        finite = reference.check_finite(gathered, logits, num_classes, True)
    else:  # each rank its own rows; the flag travels with the sums
        finite = reference.check_finite(vectors, batch.logits.detach(), num_classes, False)

    backend = _backends.resolve(options.backend, labels.device)
    counts, minority, active = backend.profile(labels, num_classes, batch.max_classes, options.threshold, False)
    if options.mode == "class":
        anchors, partners = _mine_class(backend, batch, num_classes, active, options.k, first)
    else:
        anchors, partners = backend.mine_instance(
            gathered.expand(-1, batch.labels.shape[1], -1) if shared else gathered, logits, labels, num_classes,
            active, options.k, first, own, False)
    pair_counts = reference.pair_counts(anchors, partners)
    if score_space:  # score_distances takes anchor rows aligned with the scores: pad to the global rows
        partners = torch.cat([partners.new_full((first, *partners.shape[1:]), -1), partners,
                              partners.new_full((labels.shape[0] - first - own, *partners.shape[1:]), -1)])
        d = reference.score_distances(scores, reference.check_labels(labels, num_classes, False), partners)
        overflow = torch.zeros((), dtype=torch.bool, device=d.device)
    else:
        d, overflow = backend.pair_distances(gathered, partners, first)
    margins = margins_tensor(margin, batch.num_classes, d.dtype, d.device)
    if margins.requires_grad:
        margins = _Replicated.apply(margins)
    flags = torch.stack([overflow, ~finite])  # summed over the ranks: any rank's
    sums, pair_counts, failed = _global_sums(options, backend, d, partners, margins, pair_counts, flags)
    loss = reference.reduce_sums(options.form, sums, options.reduction)
    if validate:  # only an overflow can fail here: the values were checked above
        reference._fail(~failed, reference.overflow_error(d.dtype))
    else:
        loss = reference.poison(loss, vectors, ~failed)
    return loss, BatchStats(counts, minority, active, pair_counts)


def cross_entropy(batch: Batch) -> Tensor:
    """The cross-entropy of the global batch (section 4, divided by the global batch size)."""
    from .functional import _cross_entropy

    check_process_group()
    own = batch.labels.shape[0]
    mean = _cross_entropy(batch)
    # (this rank's sum, its batch size) summed over the ranks; the gradient reaching the logits is W times theirs.
    partial = torch.stack([mean.double() * own, torch.full_like(mean, own, dtype=torch.float64)])
    total = _SumOverRanks.apply(partial, dist.get_world_size())
    return (total[0] / total[1]).to(mean.dtype)
