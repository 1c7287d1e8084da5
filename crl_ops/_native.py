"""The compiled ops (namespace `crl_ops`, schemas in csrc/ops.cpp) behind the reference's interface.

The kernels come from crl_ops._build (a prebuilt extension, a CMake library, or the shipped
sources compiled once on first use); autograd is registered in C++ (csrc/autograd.cpp); the fake
kernels here give torch.compile and `torch.library.opcheck` the output shapes. Importing this
module never fails and compiles nothing: `available(device)` does, the first time it is asked.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from ._inputs import accumulation_dtype

_UNAVAILABLE: dict = {}  # device type -> None (kernels registered) or why not; fixed once known
# Held while a device type's kernels are looked for: a thread that finds an answer in _UNAVAILABLE
# also finds the fake kernels registered, as the answer is written last.
_FIRST_USE = threading.RLock()


def unavailable_reason(device) -> Optional[str]:
    """None when the kernels for `device`'s type are registered (building them if need be), else why not."""
    device_type = torch.device(device).type
    if device_type == "meta":  # shapes only: the fake kernels, registered with the CPU kernels
        return unavailable_reason("cpu")
    if device_type in _UNAVAILABLE:
        return _UNAVAILABLE[device_type]
    with _FIRST_USE:
        if device_type not in _UNAVAILABLE:
            if device_type not in ("cpu", "cuda"):
                reason = f"crl_ops has no kernels for device type '{device_type}'"
            else:
                from . import _build

                reason = _build.ensure(device_type)
                if reason is None:
                    _register_fake_kernels()
            _UNAVAILABLE[device_type] = reason
    return _UNAVAILABLE[device_type]


def available(device) -> bool:
    """Whether the native kernels can run on a device type (`crl_ops.native_available`).

    Args:
        device: a torch.device or its name ("cpu", "cuda", ...).

    Returns:
        True when the kernels for the device's type are registered, after loading a prebuilt
        extension or compiling the shipped sources once if need be (docs/installing.md); False
        otherwise (`backend="auto"` then uses the reference, with a warning saying why).
    """
    return unavailable_reason(device) is None


def require(device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='native' but the native kernels are not available: {reason}")


_FAKES_REGISTERED = False


def _register_fake_kernels() -> None:
    """Output shapes and dtypes of every op, for torch.compile and opcheck (once the schemas exist)."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    @torch.library.register_fake("crl_ops::profile")
    def _(labels, num_classes, max_classes, threshold, validate):
        shape = (labels.shape[1], max_classes)
        return (labels.new_empty(shape), labels.new_empty(shape, dtype=torch.bool),
                labels.new_empty(shape, dtype=torch.bool))

    def mined(labels: Tensor, k: int, rows):
        num_attributes = labels.shape[1]
        return (labels.new_empty((rows, num_attributes), dtype=torch.bool),
                labels.new_empty((rows, num_attributes, 2 * k)))

    @torch.library.register_fake("crl_ops::class_lists")
    def _(logits, labels, num_classes, active, k, validate):
        shape = (labels.shape[1], logits.shape[2] if logits.dim() == 3 else 2, 2 * k)
        return logits.new_empty(shape, dtype=accumulation_dtype(logits.dtype)), labels.new_empty(shape)

    @torch.library.register_fake("crl_ops::mine_class")
    def _(logits, labels, num_classes, active, k, first_anchor, num_anchors, validate):
        return mined(labels, k, num_anchors)

    @torch.library.register_fake("crl_ops::mine_instance")
    def _(features, logits, labels, num_classes, active, k, first_anchor, num_anchors, validate):
        return mined(labels, k, num_anchors)

    @torch.library.register_fake("crl_ops::pair_distances")
    def _(vectors, partners, first_anchor):
        return (vectors.new_empty(partners.shape, dtype=accumulation_dtype(vectors.dtype)),
                vectors.new_empty((), dtype=torch.bool))

    @torch.library.register_fake("crl_ops::pair_distances_backward")
    def _(grad, vectors, partners, distances, first_anchor):
        return torch.empty_like(vectors, memory_format=torch.contiguous_format)

    @torch.library.register_fake("crl_ops::pair_sums")
    def _(distances, partners, margins, longest, form, apc_margin, bins):
        num_attributes = partners.shape[1]
        return distances.new_empty((num_attributes, 2, bins) if form == "distribution" else (num_attributes, 2))

    @torch.library.register_fake("crl_ops::pair_sums_backward")
    def _(grad, distances, partners, margins, longest, form, apc_margin, bins, margins_grad):
        return torch.empty_like(distances), margins.new_empty(margins.shape if margins_grad else (0,))

    @torch.library.register_fake("crl_ops::shard_mine")
    def _(vectors, logits, labels, num_classes, mode, k, threshold, first_anchor, num_anchors, partner_rows,
          validate):
        shape = (labels.shape[1], logits.shape[2] if logits.dim() == 3 else 2)
        return (labels.new_empty(shape), labels.new_empty(shape, dtype=torch.bool),
                labels.new_empty(shape, dtype=torch.bool), *mined(labels, k, num_anchors),
                labels.new_empty((2,), dtype=torch.bool), labels.new_empty((*shape, 2 * k) if partner_rows else (0,)))

    @torch.library.register_fake("crl_ops::shard_table")
    def _(vectors, lists, first_anchor):
        return vectors.new_empty((lists.shape[1] * lists.shape[2], lists.shape[0], vectors.shape[2]))

    @torch.library.register_fake("crl_ops::shard_table_backward")
    def _(grad_table, grad_rows, lists, first_anchor, grad_scale):
        return torch.empty_like(grad_rows, memory_format=torch.contiguous_format)

    @torch.library.register_fake("crl_ops::table_distances")
    def _(vectors, table, partners):
        acc = accumulation_dtype(vectors.dtype)
        return (vectors.new_empty(partners.shape, dtype=acc), vectors.new_empty((), dtype=torch.bool),
                vectors.new_empty((partners.shape[1],), dtype=acc))

    @torch.library.register_fake("crl_ops::table_distances_backward")
    def _(grad, vectors, table, partners, distances):
        return (vectors.new_empty((vectors.shape[0], 1 if vectors.shape[1] == 1 else table.shape[1], vectors.shape[2])),
                torch.empty_like(table, memory_format=torch.contiguous_format))

    def partial_size(num_attributes, form, bins):
        return 2 * num_attributes * (bins if form == "distribution" else 1) + 4 * num_attributes + 3

    @torch.library.register_fake("crl_ops::shard_sums")
    def _(distances, partners, anchors, margins, longest, overflow, checks, form, apc_margin, bins):
        return distances.new_empty((partial_size(partners.shape[1], form, bins),), dtype=torch.float64)

    @torch.library.register_fake("crl_ops::shard_sums_backward")
    def _(grad, distances, partners, margins, longest, form, apc_margin, bins, margins_grad):
        return torch.empty_like(distances), margins.new_empty(margins.shape if margins_grad else (0,))

    @torch.library.register_fake("crl_ops::shard_loss")
    def _(total, num_attributes, form, bins, reduction, dtype, world_size, validate):
        return (total.new_empty((), dtype=dtype), total.new_empty((num_attributes, 4), dtype=torch.int64),
                total.new_empty((), dtype=dtype))

    @torch.library.register_fake("crl_ops::shard_loss_backward")
    def _(grad, total, num_attributes, form, bins, reduction, dtype):
        return torch.empty_like(total)

    @torch.library.register_fake("crl_ops::crl_loss")
    def _(features, logits, labels, num_classes, margins, mode, form, k, apc_margin, bins, threshold, reduction,
          validate):
        num_attributes = labels.shape[1]
        max_classes = logits.shape[2] if logits.dim() == 3 else 2
        acc = accumulation_dtype(features.dtype)
        counts, minority, active = (labels.new_empty((num_attributes, max_classes)),
                                    labels.new_empty((num_attributes, max_classes), dtype=torch.bool),
                                    labels.new_empty((num_attributes, max_classes), dtype=torch.bool))
        anchors, partners = mined(labels, k, labels.shape[0])
        return (features.new_empty((), dtype=acc), counts, minority, active, anchors, partners,
                labels.new_empty((num_attributes, 4)), features.new_empty(partners.shape, dtype=acc),
                features.new_empty((num_attributes, 2), dtype=acc),
                features.new_empty((num_attributes, 2, bins if form == "distribution" else 0), dtype=acc))

    @torch.library.register_fake("crl_ops::crl_loss_backward")
    def _(grad, loss, features, partners, distances, margins, pair_counts, sums, histograms, form, apc_margin, bins,
          reduction, margins_grad):
        return (torch.empty_like(features, memory_format=torch.contiguous_format),
                margins.new_empty(margins.shape if margins_grad else (0,)))

    _FAKES_REGISTERED = True  # only once every fake kernel is registered


# ---- the reference's interface ----------------------------------------------------------------


def profile(labels: Tensor, num_classes: Tensor, max_classes: int, threshold: float, validate: bool):
    return torch.ops.crl_ops.profile(labels, num_classes, max_classes, threshold, validate)


def class_lists(logits: Tensor, labels: Tensor, num_classes: Tensor, active: Optional[Tensor], k: int,
                validate: bool):
    return torch.ops.crl_ops.class_lists.default(logits.detach(), labels, num_classes, active, k, validate)


def mine_class(logits: Tensor, labels: Tensor, num_classes: Tensor, active: Tensor, k: int, first_anchor: int,
               num_anchors: int, validate: bool):
    return torch.ops.crl_ops.mine_class.default(logits.detach(), labels, num_classes, active, k, first_anchor,
                                                num_anchors, validate)


def mine_instance(features: Tensor, logits: Tensor, labels: Tensor, num_classes: Tensor, active: Tensor, k: int,
                  first_anchor: int, num_anchors: int, validate: bool):
    return torch.ops.crl_ops.mine_instance.default(features.detach(), logits.detach(), labels, num_classes, active,
                                                   k, first_anchor, num_anchors, validate)


def pair_distances(features: Tensor, partners: Tensor, first_anchor: int = 0):
    return torch.ops.crl_ops.pair_distances.default(features, partners, first_anchor)


def pair_sums(d: Tensor, partners: Tensor, margins: Tensor, longest: Optional[Tensor], form: str, apc_margin: float,
              bins: int) -> Tensor:
    return torch.ops.crl_ops.pair_sums.default(d, partners, margins, longest, form, apc_margin, bins)


def crl_loss(features: Tensor, logits: Tensor, labels: Tensor, num_classes: Tensor, margins: Tensor, mode: str,
             form: str, k: int, apc_margin: float, bins: int, threshold: float, reduction: str, validate: bool):
    """(loss, counts, minority, active, anchors, partners, pair_counts), as reference.crl_loss."""
    # No detach of the logits: the op's autograd gives them no gradient, and a detach is one more dispatch.
    return torch.ops.crl_ops.crl_loss.default(features, logits, labels, num_classes, margins, mode, form, k,
                                              apc_margin, bins, threshold, reduction, validate)[:7]


def shard_mine(vectors: Optional[Tensor], logits: Tensor, labels: Tensor, num_classes: Tensor, mode: str, k: int,
               threshold: float, first_anchor: int, num_anchors: int, partner_rows: bool, validate: bool):
    return torch.ops.crl_ops.shard_mine.default(None if vectors is None else vectors.detach(), logits.detach(), labels,
                                                num_classes, mode, k, threshold, first_anchor, num_anchors,
                                                partner_rows, validate)


def shard_table(vectors: Tensor, lists: Tensor, first_anchor: int) -> Tensor:
    return torch.ops.crl_ops.shard_table.default(vectors, lists, first_anchor)


def shard_table_backward(grad_table: Tensor, grad_rows: Tensor, lists: Tensor, first_anchor: int,
                         grad_scale: Tensor) -> Tensor:
    return torch.ops.crl_ops.shard_table_backward.default(grad_table, grad_rows, lists, first_anchor, grad_scale)


def table_distances(vectors: Tensor, table: Tensor, partners: Tensor):
    return torch.ops.crl_ops.table_distances.default(vectors, table, partners)


def table_distances_backward(grad: Tensor, vectors: Tensor, table: Tensor, partners: Tensor, distances: Tensor):
    return torch.ops.crl_ops.table_distances_backward.default(grad, vectors, table, partners, distances)


def shard_sums(d: Tensor, partners: Tensor, anchors: Tensor, margins: Tensor, longest: Optional[Tensor],
               overflow: Tensor, checks: Tensor, form: str, apc_margin: float, bins: int) -> Tensor:
    return torch.ops.crl_ops.shard_sums.default(d, partners, anchors, margins, longest, overflow, checks, form,
                                                apc_margin, bins)


def shard_loss(total: Tensor, num_attributes: int, form: str, bins: int, reduction: str, dtype: torch.dtype,
               world_size: int, validate: bool):
    return torch.ops.crl_ops.shard_loss.default(total, num_attributes, form, bins, reduction, dtype, world_size,
                                                validate)
