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

from ._inputs import accumulation_dtype


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


_BUILT_FOR: dict = {}  # dispatch key -> whether the kernels are registered: fixed once loaded, and each query costs µs


def available(device: torch.device) -> bool:
    """True when the kernels for `device`'s type are compiled in."""
    if not loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key not in _BUILT_FOR:
        _BUILT_FOR[key] = key is not None and _has_kernel("profile", key)
    return _BUILT_FOR[key]


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

    def _fake_loss(features: Tensor, partners: Tensor):
        """The scalar loss and the pair distances every loss op returns first."""
        loss = features.new_empty((), dtype=accumulation_dtype(features.dtype))
        return loss, loss.new_empty(partners.shape)

    @torch.library.register_fake("crl_ops::relative_loss")
    def _(features, partners, margins):
        return *_fake_loss(features, partners), partners.new_empty(())

    @torch.library.register_fake("crl_ops::absolute_loss")
    def _(features, partners, margin):
        return *_fake_loss(features, partners), partners.new_empty((2,))

    @torch.library.register_fake("crl_ops::distribution_loss")
    def _(features, partners, bins):
        loss, distances = _fake_loss(features, partners)
        num_attributes = features.shape[1]
        return (
            loss,
            distances,
            loss.new_empty((num_attributes, 2, bins)),
            loss.new_empty((num_attributes,)),
            partners.new_empty((num_attributes, 2)),
        )

    for _name in ("relative_loss_backward", "absolute_loss_backward", "distribution_loss_backward"):

        @torch.library.register_fake(f"crl_ops::{_name}")
        def _(grad, features, *args):
            return torch.empty_like(features, memory_format=torch.contiguous_format)

    # ---- autograd: each loss op's backward is an op of its own ----------------------------------
    # A loss op is (features, partners, option) -> (loss, distances, *counts), where option is the
    # margins tensor, the contrastive margin or the number of bins; its backward op takes
    # (grad, features, partners, distances, option, *counts) and returns d loss / d features.

    def _setup_loss(ctx, inputs, output):
        features, partners, option = inputs
        ctx.mark_non_differentiable(*output[1:])  # distances and counts only feed the backward
        ctx.set_materialize_grads(False)  # so autograd does not fill their (unused) gradients with zeros
        ctx.option = None if isinstance(option, Tensor) else option  # a tensor option is saved instead
        ctx.save_for_backward(features, partners, *output[1:], *([option] if ctx.option is None else []))

    def _loss_backward(name: str):
        backward_op = getattr(ops, f"{name}_backward")

        def backward(ctx, grad, *_aux_grads):
            if grad is None:  # not materialised (see set_materialize_grads): the loss took no gradient
                return None, None, None
            features, partners, distances, *rest = ctx.saved_tensors
            option = rest.pop() if ctx.option is None else ctx.option
            return backward_op(grad, features, partners, distances, option, *rest), None, None

        return backward

    def _no_double_backward(name: str):
        def backward(ctx, *grads):
            raise RuntimeError(f"crl_ops::{name} has no double backward")

        return backward

    for _name in ("relative_loss", "absolute_loss", "distribution_loss"):
        torch.library.register_autograd(f"crl_ops::{_name}", _loss_backward(_name), setup_context=_setup_loss)
        torch.library.register_autograd(f"crl_ops::{_name}_backward", _no_double_backward(f"{_name}_backward"))


# ---- the reference's interface ----------------------------------------------------------------


def profile(labels: Tensor, max_classes: int):
    return torch.ops.crl_ops.profile(labels, max_classes)


def mine_class(scores: Tensor, labels: Tensor, active: Tensor, k: int):
    return torch.ops.crl_ops.mine_class(scores, labels, active, k)


def mine_instance(features: Tensor, predictions: Tensor, labels: Tensor, active: Tensor, k: int):
    return torch.ops.crl_ops.mine_instance(features.detach(), predictions, labels, active, k)


def relative_loss(features: Tensor, partners: Tensor, margins: Tensor) -> Tensor:
    return torch.ops.crl_ops.relative_loss(features, partners, margins)[0]


def absolute_loss(features: Tensor, partners: Tensor, margin: float) -> Tensor:
    return torch.ops.crl_ops.absolute_loss(features, partners, float(margin))[0]


def distribution_loss(features: Tensor, partners: Tensor, bins: int) -> Tensor:
    return torch.ops.crl_ops.distribution_loss(features, partners, bins)[0]
