"""Global-batch CRL under torch.distributed: every rank profiles and mines over all ranks' samples.

With per-GPU batches of a few dozen samples, a per-GPU minority profile sees almost no minority
samples. `gather_batch` concatenates the normalised `Batch` of every rank of the default process
group (in rank order, uneven batch sizes allowed), so each rank computes the loss of the global
batch: the same value on every rank, equal to one process's loss on the concatenated batch.

Gradients. Every rank computes the same loss L of the global batch, and the gather's backward
sums, over ranks, the gradients that arrive for this rank's rows. Rank r's features therefore
receive W * dL/dx_r (W ranks), and DDP's average over the ranks turns that into exactly the
parameter gradient of a single process on the concatenated batch.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

import dataclasses

from ._inputs import Batch


def check_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) (torchrun sets up its environment) before the "
            "first forward, or pass distributed=False"
        )


def _shares_features(batch: Batch) -> bool:
    """[B, D] features expanded to [B, A, D]: gather the [B, 1, D] view, not A copies."""
    features = batch.features
    return features.shape[1] > 1 and features.stride(1) == 0


def _layout(batch: Batch) -> str:
    """Everything except the batch size that must agree across ranks for the gather to line up."""
    return (
        f"features [*, {', '.join(map(str, batch.features.shape[1:]))}] {batch.features.dtype}"
        f"{' (shared by all attributes)' if _shares_features(batch) else ''}, "
        f"logits {batch.logits.dtype} with classes {batch.num_classes}"
    )


def _batch_sizes(batch: Batch) -> list[int]:
    """Every rank's batch size, from one collective that also checks that the ranks' layouts agree."""
    layout = _layout(batch)
    mine = torch.tensor([batch.labels.shape[0], zlib.crc32(layout.encode())], device=batch.labels.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    sizes, signatures = zip(*torch.stack(everyone).tolist())
    differing = [rank for rank, signature in enumerate(signatures) if signature != signatures[0]]
    if differing:
        raise ValueError(
            f"distributed=True: the inputs of rank(s) {differing} differ from rank 0's in feature shape, "
            f"dtype or class counts; every rank must pass the same format, only the batch size may "
            f"differ (rank {dist.get_rank()} has {layout})"
        )
    return list(sizes)


def _all_gather_rows(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenates every rank's `tensor` along dim 0; ranks may hold different numbers of rows."""
    # Collectives need one shape on every rank: pad to the longest, then trim each rank's rows.
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[:rows] for chunk, rows in zip(chunks, sizes)])


class _GatherRows(torch.autograd.Function):
    """Differentiable `_all_gather_rows` of several tensors; backward sums each rank's gradient for our rows."""

    @staticmethod
    def forward(ctx, sizes: list[int], *tensors: Tensor):
        rank = dist.get_rank()
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return tuple(_all_gather_rows(t, sizes) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        own = []
        for needed, grad in zip(ctx.needs_input_grad[1:], grads):
            if not needed:
                own.append(None)
                continue
            summed = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
            dist.all_reduce(summed)
            own.append(summed[ctx.rows])
        return (None, *own)


@torch.compiler.disable  # data-dependent sizes and host synchronisation: runs eagerly under torch.compile
def gather_batch(batch: Batch) -> Batch:
    """The global batch: every rank's features, logits and labels, in rank order."""
    check_process_group()
    sizes = _batch_sizes(batch)
    shared = _shares_features(batch)
    features = batch.features[:, :1] if shared else batch.features
    features, logits = _GatherRows.apply(sizes, features, batch.logits)
    if shared:
        features = features.expand(-1, batch.labels.shape[1], -1)
    labels = _all_gather_rows(batch.labels, sizes)
    return Batch(features=features, logits=logits, labels=labels, num_classes=batch.num_classes)


def class_rectification_loss(options, margin, batch: Batch):
    """l_crl of the global batch on every rank, and its statistics (the entry of crl_ops.functional)."""
    from .functional import _crl

    return _crl(dataclasses.replace(options, distributed=False), margin, gather_batch(batch))


def cross_entropy(batch: Batch):
    """The cross-entropy of the global batch (section 4, divided by the global batch size)."""
    from .functional import _cross_entropy

    return _cross_entropy(gather_batch(batch))
