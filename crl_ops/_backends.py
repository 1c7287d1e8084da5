"""Backend selection: the native kernels (when they can run on the tensors' device) or the reference.

A backend is a module with the functions of `crl_ops.reference` (profile, class_lists,
mine_class, mine_instance, pair_distances, pair_sums, crl_loss, and crl_ops.distributed's
shard_mine, shard_table(_backward), table_distances(_backward), shard_sums, shard_loss) and the
same signatures; `crl_ops._native` wraps the compiled ops behind that interface.
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch

from . import _native, reference
from ._inputs import BACKENDS, check_choice

_WARNED: set = set()


def check_backend(name: str) -> str:
    return check_choice("backend", name, BACKENDS)


@torch.compiler.assume_constant_result
def _native_for(device_type: str) -> bool:
    # Fixed for the life of the process: torch.compile evaluates it once while tracing instead of
    # breaking the graph on what is inside.
    return _native.available(device_type)


def resolve(name: str, device: torch.device, like=None) -> ModuleType:
    """The backend module for `name` on `device`; `name` was checked. backend="auto" falls back to the
    reference where the kernels cannot run, with one warning per device type saying why. Under a
    torch.func transform (`like` is a functorch-wrapped tensor) the reference computes the same
    function: C++ autograd functions take no functorch transforms."""
    if name == "reference" or (like is not None and not torch.compiler.is_compiling()
                               and torch._C._functorch.is_functorch_wrapped_tensor(like)):
        return reference
    if _native_for(device.type):
        return _native
    if name == "native":
        _native.require(device)  # raises, saying why the kernels are missing
    _warn_fallback(device.type)
    return reference


@torch.compiler.assume_constant_result
def _warn_fallback(device_type: str) -> bool:
    # Once per device type. torch.compile runs it while tracing, outside the graph: a warning inside
    # a fullgraph=True graph would be an unsupported call.
    if device_type not in _WARNED and device_type != "meta":
        _WARNED.add(device_type)
        warnings.warn(f"crl_ops: using the pure-PyTorch reference on {device_type}, which is much slower and "
                      f"keeps [A, B, B] distance matrices, because {_native.unavailable_reason(device_type)}",
                      RuntimeWarning, stacklevel=4)
    return True
