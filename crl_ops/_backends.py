"""Backend selection: the native kernels (csrc/, when built for the device) or the reference.

A backend is a module with the functions of `crl_ops.reference` (profile, mine_class,
mine_instance, relative_loss, absolute_loss, distribution_loss) and the same
signatures; `crl_ops._native` wraps the compiled ops behind that interface.
"""
from __future__ import annotations

from types import ModuleType

import torch

from . import _native, reference

BACKENDS = ("auto", "native", "reference")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@torch.compiler.assume_constant_result
def _native_built_for(device_type: str) -> bool:
    # Fixed for the life of the process: torch.compile evaluates it once while tracing instead of
    # breaking the graph on the dispatcher query inside.
    return _native.available(torch.device(device_type))


def resolve(name: str, device: torch.device) -> ModuleType:
    check_backend(name)
    if name == "reference":
        return reference
    if _native_built_for(device.type):
        return _native
    if name == "native":
        _native.require(device)  # raises, saying why the kernels are missing
    return reference
