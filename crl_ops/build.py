"""Compiles the native kernels ahead of time, into torch's extension cache, so that the first use
does not (a container image build, a cluster's login node before the jobs start):

    python -m crl_ops.build            # the CPU kernels, and the CUDA ones where torch has CUDA and nvcc is found
    python -m crl_ops.build --cuda     # the CUDA kernels (no GPU needed with TORCH_CUDA_ARCH_LIST set)

Prints where the kernels come from and how long it took; exits 1 with the reason on failure.
The cache follows TORCH_EXTENSIONS_DIR; docs/installing.md has the details.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import _build


def default_device_types() -> list[str]:
    with_cuda = torch.version.cuda is not None and _build.cuda_home() is not None
    return ["cpu", "cuda"] if with_cuda else ["cpu"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crl_ops.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU kernels")
    parser.add_argument("--cuda", action="store_true", help="the CUDA kernels (and the CPU ones they sit on)")
    args = parser.parse_args(argv)
    device_types = [name for name in ("cpu", "cuda") if getattr(args, name)] or default_device_types()
    status = 0
    for device_type in device_types:
        start = time.monotonic()
        reason = _build.ensure(device_type, retry=True)
        seconds = time.monotonic() - start
        if reason is None:
            print(f"crl_ops: native {device_type.upper()} kernels from {_build.ORIGINS[device_type]} ({seconds:.0f} s)")
        else:
            print(f"crl_ops: no native {device_type.upper()} kernels: {reason}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
