"""The compiled ops (namespace `crl_ops`, schemas in csrc/ops.cpp) behind the reference's interface.

Fake (meta) kernels and autograd are registered here, from Python, so that the ops work with
torch.compile and `torch.library.opcheck`. Importing this module never fails: when the
extension is not built, `available()` is False and `require()` says how to build it.
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor


def _load() -> str | None:
    """Loads the kernels; returns why not, or None. CRL_OPS_LIBRARY may name a library built with
    CMake (libcrl_ops.so) to use instead of the Python extension."""
    library = os.environ.get("CRL_OPS_LIBRARY")
    try:
        if library:
            torch.ops.load_library(library)
        else:
            importlib.import_module("crl_ops._C")
    except (ImportError, OSError) as error:  # the package works without its kernels
        return str(error)
    return None


_LOAD_ERROR: str | None = _load()

BUILD_HINT = (
    "build the native kernels with `pip install --no-build-isolation .` (or `python setup.py build_ext "
    "--inplace`) in an environment that has torch; set FORCE_CUDA=1 with CUDA_HOME to build the CUDA "
    "kernels on a machine without a GPU"
)


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"crl_ops::{op}", dispatch_key)


def loaded() -> bool:
    return _LOAD_ERROR is None


def available(device: torch.device) -> bool:
    """True when the kernels for `device`'s type are compiled in."""
    if not loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and _has_kernel("profile", key)


def require(device: torch.device) -> None:
    if not loaded():
        raise RuntimeError(f"backend='native' but the crl_ops extension is not built ({_LOAD_ERROR}); {BUILD_HINT}")
    if not available(device):
        raise RuntimeError(
            f"backend='native' but the crl_ops extension has no kernels for device type "
            f"'{torch.device(device).type}'; {BUILD_HINT}"
        )


if loaded():
    ops = torch.ops.crl_ops

    # ---- fake kernels: output shapes and dtypes only ------------------------------------------

    def _accumulation(dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    @torch.library.register_fake("crl_ops::profile")
    def _(labels: Tensor, max_classes: int):
        shape = (labels.shape[1], max_classes)
        return (
            labels.new_empty(shape, dtype=torch.long),
            labels.new_empty(shape, dtype=torch.bool),
            labels.new_empty(shape, dtype=torch.bool),
        )

    def _fake_mined(like: Tensor, labels: Tensor, k: int):
        batch_size, num_attributes = labels.shape
        return (
            like.new_empty((batch_size, num_attributes), dtype=torch.bool),
            like.new_empty((batch_size, num_attributes, 2 * k), dtype=torch.long),
        )

    @torch.library.register_fake("crl_ops::mine_class")
    def _(scores, labels, active, k):
        return _fake_mined(scores, labels, k)

    @torch.library.register_fake("crl_ops::mine_instance")
    def _(features, predictions, labels, active, k):
        return _fake_mined(features, labels, k)

    @torch.library.register_fake("crl_ops::pair_distances")
    def _(features, partners):
        return features.new_empty(partners.shape, dtype=_accumulation(features.dtype))

    @torch.library.register_fake("crl_ops::pair_distances_backward")
    def _(grad, features, partners, distances):
        return torch.empty_like(features, memory_format=torch.contiguous_format)

    @torch.library.register_fake("crl_ops::relative_loss")
    def _(distances, partners, margins):
        return distances.new_empty(()), distances.new_empty((), dtype=torch.long)

    @torch.library.register_fake("crl_ops::absolute_loss")
    def _(distances, partners, margin):
        return distances.new_empty(()), distances.new_empty((2,), dtype=torch.long)

    @torch.library.register_fake("crl_ops::distribution_loss")
    def _(distances, partners, bins):
        num_attributes = distances.shape[1]
        return (
            distances.new_empty(()),
            distances.new_empty((num_attributes, 2, bins)),
            distances.new_empty((num_attributes,)),
            distances.new_empty((num_attributes, 2), dtype=torch.long),
        )

    for _name in ("relative_loss_backward", "absolute_loss_backward", "distribution_loss_backward"):

        @torch.library.register_fake(f"crl_ops::{_name}")
        def _(grad, distances, *args):
            return torch.empty_like(distances, memory_format=torch.contiguous_format)

    # ---- autograd: each backward is an op of its own ------------------------------------------

    def _no_double_backward(name: str):
        def backward(ctx, *grads):
            raise RuntimeError(f"crl_ops::{name} has no double backward")

        return backward

    def _setup_pair_distances(ctx, inputs, output):
        features, partners = inputs
        ctx.save_for_backward(features, partners, output)

    def _backward_pair_distances(ctx, grad):
        features, partners, distances = ctx.saved_tensors
        return ops.pair_distances_backward(grad.contiguous(), features, partners, distances), None

    torch.library.register_autograd(
        "crl_ops::pair_distances", _backward_pair_distances, setup_context=_setup_pair_distances
    )

    def _setup_relative(ctx, inputs, output):
        distances, partners, margins = inputs
        ctx.save_for_backward(distances, partners, margins, output[1])

    def _backward_relative(ctx, grad, _grad_count):
        distances, partners, margins, num_triplets = ctx.saved_tensors
        return ops.relative_loss_backward(grad, distances, partners, margins, num_triplets), None, None

    torch.library.register_autograd("crl_ops::relative_loss", _backward_relative, setup_context=_setup_relative)

    def _setup_absolute(ctx, inputs, output):
        distances, partners, margin = inputs
        ctx.margin = margin
        ctx.save_for_backward(distances, partners, output[1])

    def _backward_absolute(ctx, grad, _grad_count):
        distances, partners, num_pairs = ctx.saved_tensors
        return ops.absolute_loss_backward(grad, distances, partners, ctx.margin, num_pairs), None, None

    torch.library.register_autograd("crl_ops::absolute_loss", _backward_absolute, setup_context=_setup_absolute)

    def _setup_distribution(ctx, inputs, output):
        distances, partners, bins = inputs
        ctx.mark_non_differentiable(*output[1:])  # histograms and scale only feed the backward
        ctx.bins = bins
        ctx.save_for_backward(distances, partners, *output[1:])

    def _backward_distribution(ctx, grad, *_aux_grads):
        distances, partners, histograms, scale, pair_counts = ctx.saved_tensors
        grad_d = ops.distribution_loss_backward(
            grad, distances, partners, ctx.bins, histograms, scale, pair_counts
        )
        return grad_d, None, None

    torch.library.register_autograd(
        "crl_ops::distribution_loss", _backward_distribution, setup_context=_setup_distribution
    )

    for _name in ("pair_distances_backward", "relative_loss_backward", "absolute_loss_backward",
                  "distribution_loss_backward"):
        torch.library.register_autograd(f"crl_ops::{_name}", _no_double_backward(_name))


# ---- the reference's interface ----------------------------------------------------------------


def profile(labels: Tensor, max_classes: int):
    return torch.ops.crl_ops.profile(labels, max_classes)


def mine_class(scores: Tensor, labels: Tensor, active: Tensor, k: int):
    return torch.ops.crl_ops.mine_class(scores, labels, active, k)


def mine_instance(features: Tensor, predictions: Tensor, labels: Tensor, active: Tensor, k: int):
    return torch.ops.crl_ops.mine_instance(features.detach(), predictions, labels, active, k)


def pair_distances(features: Tensor, partners: Tensor) -> Tensor:
    return torch.ops.crl_ops.pair_distances(features, partners)


def relative_loss(d: Tensor, partners: Tensor, margins: Tensor) -> Tensor:
    return torch.ops.crl_ops.relative_loss(d, partners, margins.to(d.dtype))[0]


def absolute_loss(d: Tensor, partners: Tensor, margin: float) -> Tensor:
    return torch.ops.crl_ops.absolute_loss(d, partners, float(margin))[0]


def distribution_loss(d: Tensor, partners: Tensor, bins: int) -> Tensor:
    return torch.ops.crl_ops.distribution_loss(d, partners, bins)[0]
