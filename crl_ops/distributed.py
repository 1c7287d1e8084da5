"""Global-batch CRL under torch.distributed, sharded by anchor (docs/scaling.md).

With per-GPU batches of a few dozen samples, a per-GPU minority profile sees almost no minority
samples, so `distributed=True` profiles and mines over the samples of all ranks of the default
process group. The result equals one process on the concatenated batch (ranks in order, uneven
batch sizes allowed), but each rank only does its share of the work:

- forward: one all-gather of every rank's CRL vectors (features or normalised features; with
  distance="score" the logits themselves, which then carry the gradient), labels and logits,
  packed as bytes; then per rank one op (backend.shard_mine) profiles the global batch and mines
  the rank's own anchors against the candidates of all ranks, pair_distances measures their pairs,
  one op (backend.shard_sums) reduces them to per-attribute sums, pair counts and value flags in
  one float64 vector, one all-reduce adds the ranks' vectors, and one op (backend.shard_loss)
  gives the global loss, statistics and value errors, the same on every rank. The histogram form
  all-reduces each attribute's longest distance R (a max) before its histograms. Ranks with fewer
  samples pad to the largest batch for the all-gather; the padding is dropped after it.
- backward: shard_loss, shard_sums and pair_distances in reverse; the gradient of the gathered
  CRL vectors goes back to the ranks that own them with one reduce-scatter. A tensor margin is
  replicated: its gradient is all-reduced.
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

Value checks (validate=True) never leave a rank waiting in a collective. Labels are checked on
the gathered labels, which every rank holds, inside shard_mine: every rank raises the same error
(naming the row of the concatenated batch). Non-finite logits or features, and an overflowing
distance, are flags of a rank's own rows that travel in the all-reduce: shard_loss raises the
same error on every rank after it. Nothing is read on the host: on the CPU the ops read their
own memory, on CUDA they are device-side assertions.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

from . import _backends, reference
from ._inputs import Batch, accumulation_dtype, cached_tensor

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


def _all_reduce(tensor: Tensor, op: str, in_place: bool = False) -> Tensor:
    """The reduction over the ranks; in_place: into `tensor` itself (contiguous, and not needed after)."""
    if torch.compiler.is_compiling():
        return fc.wait_tensor(fc.all_reduce(tensor.contiguous(), op, _group()))
    out = tensor if in_place else tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=_REDUCE_OPS[op])
    return out


def _shares_features(features: Tensor) -> bool:
    """[B, D] features expanded to [B, A, D]: gather the [B, 1, D] view, not A copies."""
    return features.shape[1] > 1 and features.stride(1) == 0


def _margin_text(margin) -> str:
    if margin is None:
        return "2*pi/C_j"
    if isinstance(margin, Tensor):  # a parameter's values are the same everywhere under DDP; not read here
        return f"tensor {list(margin.shape)} {margin.dtype}{' requiring grad' if margin.requires_grad else ''}"
    return repr(margin)


def _layout(options, margin, batch: Batch, vectors: Tensor, caller: str) -> str:
    """Everything but the batch size that must agree across ranks: the collectives' sizes, the
    options that decide what every rank computes from the same global sums, and what decides
    which collectives run (the caller's, and the backward's: whether the vectors and a margin
    tensor take a gradient)."""
    features, logits = batch.features, batch.logits
    return (
        f"{caller}: features [*, {', '.join(map(str, features.shape[1:]))}] {features.dtype}"
        f"{' (shared by all attributes)' if _shares_features(features) else ''} on {features.device.type}, "
        f"logits [*, {', '.join(map(str, logits.shape[1:]))}] {logits.dtype} with classes {batch.num_classes}, "
        f"CRL vectors {vectors.dtype}{' requiring grad' if vectors.requires_grad else ''}, "
        f"options mode={options.mode} form={options.form} k={options.k} "
        f"margin={_margin_text(margin)} apc_margin={options.apc_margin} bins={options.bins} "
        f"threshold={options.threshold} normalize={options.normalize} reduction={options.reduction} "
        f"distance={options.distance} validate={options.validate} batch_sizes={options.batch_sizes}"
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
            f"distributed=True: the inputs of rank(s) {differing} differ from rank 0's in format or CRL options; "
            f"every rank must pass the same format and options, only the batch size may differ (rank "
            f"{dist.get_rank()} has {layout})"
        )
    if sum(sizes) == 0:
        raise ValueError("distributed=True: every rank's labels are empty; the global batch must hold at least one "
                         "sample")
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


def _concatenated_rows(sizes: tuple, device: torch.device) -> Tensor:
    """The rows of the padded gathered batch that hold samples, in rank order."""
    rows = max(sizes)
    return torch.cat([torch.arange(q * rows, q * rows + size, device=device) for q, size in enumerate(sizes)])


def _gather_rows(sizes: tuple, parts: list) -> list:
    """[N, ...] for each (tensor, fill) of `parts` (tensors with this rank's rows first): the rows of
    all ranks in rank order, N = sum(sizes), from one all-gather of their bytes. Ranks with fewer
    rows pad to the largest batch with `fill`; the padding is dropped after the gather. The first
    tensor comes back as a strided view of the gathered buffer (the kernels read in place), the
    others as views where their bytes align, else copies."""
    rows, own = max(sizes), parts[0][0].shape[0]
    flat = []
    for tensor, fill in parts:
        if own < rows:
            tensor = torch.cat([tensor, tensor.new_full((rows - own, *tensor.shape[1:]), fill)])
        flat.append(tensor.reshape(rows, -1).contiguous().view(torch.uint8))
    widths = [f.shape[1] for f in flat]
    padding = -sum(widths) % 8  # rows of whole 8-byte words: every piece can be viewed in its dtype
    if padding:
        flat.append(flat[0].new_zeros((rows, padding)))
    gathered = _all_gather(torch.cat(flat, dim=1) if len(flat) > 1 else flat[0])
    if len(set(sizes)) > 1:
        gathered = gathered.index_select(0, _concatenated_rows(sizes, gathered.device))
    out, offset = [], 0
    for (tensor, _), width in zip(parts, widths):
        piece = gathered[:, offset: offset + width]
        if offset % tensor.element_size() or width % tensor.element_size():
            piece = piece.contiguous()
        out.append(piece.view(tensor.dtype).view(-1, *tensor.shape[1:]))
        offset += width
    return out


def _token(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A view of a constant 0-dim tensor, an output of the autograd functions below whose gradient is
    shard_loss's grad_scale (passed by _WithGradScale): how the factor of the gradient convention,
    known only after the all-reduce, reaches the backward that returns the ranks' gradients. On
    the vectors' device, as autograd requires of a gradient."""
    return cached_tensor((0.0,), dtype, device)[0]


class _GatherRows(torch.autograd.Function):
    """The rows of all ranks, in one all-gather: CRL's vectors, then the tensors that only steer the
    mining (`steering`: (tensor, fill) pairs; no gradient), and a token. Backward: the vectors'
    gradient, summed over the ranks by a reduce-scatter, returns to its owner times the token's
    gradient, shard_loss's grad_scale: W (the convention above), or NaN after a non-finite value."""

    @staticmethod
    def forward(ctx, sizes: tuple, vectors: Tensor, steering: tuple, token_dtype: torch.dtype):
        ctx.sizes, ctx.own = sizes, vectors.shape[0]
        gathered = _gather_rows(sizes, [(vectors, 0), *steering])  # forward runs without autograd
        ctx.mark_non_differentiable(*gathered[1:])
        ctx.set_materialize_grads(False)  # the steering tensors take no zero-filled gradients
        return (*gathered, _token(token_dtype, vectors.device))

    @staticmethod
    def backward(ctx, grad: Tensor, *rest):
        grad_scale = rest[-1]
        if grad is None:  # no pair took a gradient
            return None, None, None, None
        if len(set(ctx.sizes)) > 1:  # back to the padded layout of the collectives
            rows = _concatenated_rows(ctx.sizes, grad.device)
            grad = grad.new_zeros((len(ctx.sizes) * max(ctx.sizes), *grad.shape[1:])).index_copy_(0, rows, grad)
        return None, _reduce_scatter(grad)[: ctx.own] * grad_scale, None, None


class _PartnerDistances(torch.autograd.Function):
    """Class mode: the distances of this rank's anchors to their partners, whose vectors come from
    their owners: each rank fills its entries of the partner table (backend.shard_table), one
    all-reduce (sum) completes it, backend.table_distances measures. Backward: the table's gradient
    is all-reduced (every rank's anchors use it) and each owner adds its entries' to its anchors'
    gradient, times the token's gradient, grad_scale (backend.shard_table_backward)."""

    @staticmethod
    def forward(ctx, vectors: Tensor, partners: Tensor, lists: Tensor, first: int, backend, token_dtype):
        vectors = vectors.detach()
        table = _all_reduce(backend.shard_table(vectors, lists, first), "sum", in_place=True)
        d, overflow, longest = backend.table_distances(vectors, table, partners)
        ctx.save_for_backward(vectors, table, partners, lists, d)
        ctx.first, ctx.backend = first, backend
        ctx.mark_non_differentiable(overflow, longest)
        ctx.set_materialize_grads(False)
        return d, overflow, longest, _token(token_dtype, vectors.device)

    @staticmethod
    def backward(ctx, grad: Tensor, _overflow, _longest, grad_scale: Tensor):
        if grad is None:
            return None, None, None, None, None, None
        vectors, table, partners, lists, d = ctx.saved_tensors
        grad_rows, grad_table = ctx.backend.table_distances_backward(grad, vectors, table, partners, d)
        grad_table = _all_reduce(grad_table, "sum", in_place=True)
        return (ctx.backend.shard_table_backward(grad_table, grad_rows, lists, ctx.first, grad_scale),
                None, None, None, None, None)


class _WithGradScale(torch.autograd.Function):
    """Identity on the loss; its backward hands grad_scale to the token of _GatherRows."""

    @staticmethod
    def forward(ctx, loss: Tensor, token: Tensor, grad_scale: Tensor):
        ctx.save_for_backward(grad_scale)
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, ctx.saved_tensors[0], None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank partial sums, in place. Every rank holds the same dL/d(total),
    which is dL/d(each rank's part): the backward passes it on, times `grad_scale`."""

    @staticmethod
    def forward(ctx, partial: Tensor, grad_scale: int):
        ctx.grad_scale = grad_scale
        if not torch.compiler.is_compiling():  # traced, the collective is functional: a new tensor
            ctx.mark_dirty(partial)
        return _all_reduce(partial, "sum", in_place=True)

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


def _own_rows(t: Tensor, first: int, own: int, total: int, fill) -> Tensor:
    """[total, ...]: this rank's rows of `t` at first..first + own, `fill` elsewhere."""
    before, after = t.new_full((first, *t.shape[1:]), fill), t.new_full((total - first - own, *t.shape[1:]), fill)
    return torch.cat([before, t, after])


def class_rectification_loss(options, margin, batch: Batch, caller: str = "CRL"):
    """l_crl of the global batch on every rank, and its statistics (the entry of crl_ops.functional)."""
    from .functional import BatchStats, crl_features, margins_tensor

    check_process_group()
    score_space = options.distance == "score"  # the journal's class-level triplets: distances between scores
    # The vectors whose gradient returns to their owners: the logits in score space, else CRL's features.
    vectors = batch.logits if score_space else crl_features(options, batch)
    shared = not score_space and _shares_features(vectors)
    own = batch.labels.shape[0]
    sizes = _rank_sizes(_layout(options, margin, batch, vectors, caller), own, options.batch_sizes,
                        batch.labels.device)
    first = sum(sizes[: dist.get_rank()])  # this rank's first row in the concatenated batch
    num_classes = batch.classes_tensor()
    num_attributes = batch.labels.shape[1]
    accumulation = accumulation_dtype(vectors.dtype)

    backend = _backends.resolve(options.backend, batch.labels.device)
    # Class mode needs its anchors' partners only: their rows travel in a table [Cmax 2K, A, D],
    # where that is smaller than the gathered vectors [N, Ax, D] (docs/scaling.md).
    table_vectors = batch.max_classes * 2 * options.k * num_attributes
    gathered_vectors = sum(sizes) * (1 if shared else num_attributes)
    partner_rows = options.mode == "class" and not score_space and table_vectors < gathered_vectors
    steering = [(batch.labels, -1)] + ([] if score_space else [(batch.logits.detach(), 0)])
    if partner_rows:  # labels and logits only
        labels, logits = _gather_rows(sizes, steering)
    else:
        gathered, labels, *logits, token = _GatherRows.apply(sizes, vectors[:, :1] if shared else vectors,
                                                              tuple(steering), accumulation)
        logits = gathered.detach() if score_space else logits[0]

    if options.mode == "instance":  # mined against the gathered vectors
        mined_vectors = gathered.expand(-1, num_attributes, -1) if shared else gathered
    else:  # this rank's own rows, checked
        mined_vectors = None if score_space else vectors
    counts, minority, active, anchors, partners, checks, lists = backend.shard_mine(
        mined_vectors, logits, labels, num_classes, options.mode, options.k, options.threshold, first, own,
        partner_rows, options.validate)
    longest = None
    if partner_rows:
        d, overflow, longest, token = _PartnerDistances.apply(vectors[:, :1] if shared else vectors, partners, lists,
                                                              first, backend, accumulation)
    elif score_space:  # the distances are torch operations on the scores of the whole batch
        features_finite = torch.isfinite(batch.features).all()
        checks = torch.stack([checks[0], checks[1] | ~features_finite])
        total_rows = labels.shape[0]
        partners = _own_rows(partners, first, own, total_rows, -1)
        anchors = _own_rows(anchors, first, own, total_rows, False)
        d = reference.score_distances(reference.class_scores(gathered, num_classes),
                                      reference.check_labels(labels, num_classes, False), partners)
        overflow = torch.zeros((), dtype=torch.bool, device=d.device)
    else:
        d, overflow = backend.pair_distances(gathered, partners, first)
    if options.form == "distribution":  # every rank's histograms on the same nodes: the global longest distance
        if longest is None:
            longest = d.detach().amax(dim=(0, 2)) if own else d.new_zeros(num_attributes)
        longest = _all_reduce(longest, "max", in_place=True)
    margins = margins_tensor(margin, batch.num_classes, d.dtype, d.device)
    if margins.requires_grad:
        margins = _Replicated.apply(margins)
    partial = backend.shard_sums(d, partners, anchors, margins, longest, overflow, checks, options.form,
                                 options.apc_margin, options.bins)
    total = _SumOverRanks.apply(partial, 1)
    loss, pair_counts, grad_scale = backend.shard_loss(total, num_attributes, options.form, options.bins,
                                                       options.reduction, d.dtype, dist.get_world_size(),
                                                       options.validate)
    return _WithGradScale.apply(loss, token, grad_scale), BatchStats(counts, minority, active, pair_counts)


def cross_entropy(batch: Batch) -> Tensor:
    """The cross-entropy of the global batch (section 4, divided by the global batch size)."""
    from .functional import _cross_entropy

    check_process_group()
    own = batch.labels.shape[0]
    mean = _cross_entropy(batch) if own else batch.logits.new_zeros((), dtype=accumulation_dtype(batch.logits.dtype))
    # (this rank's sum, its batch size) summed over the ranks; the gradient reaching the logits is W times theirs.
    partial = torch.stack([mean.double() * own, torch.full_like(mean, own, dtype=torch.float64)])
    total = _SumOverRanks.apply(partial, dist.get_world_size())
    return (total[0] / total[1]).to(mean.dtype)
