"""One CRL step on a given build of the emulated CUDA device against the CPU kernels, for
test_emulator.py's injected bugs: `python -m tests.emulation_probe LIBRARY CASE` prints
"ERROR: <the emulator's report>" (exit 3), "MISMATCH: <what differs>" (exit 4) or "SAME".

Cases: "small" (B = 300, three binary attributes: the profile's counts in shared memory) and
"6000-classes" (an attribute of 6000 classes beside a binary one: the counts in global memory).
"""
import sys

import torch

from crl_ops import _native

from .cuda_emulation import RUNS, EmulatedCuda
from .test_cuda import Result, crl_op
from .problems import make_problem


def problem(case):
    if case == "small":
        return make_problem(3, 300, (2, 2, 2), 8, False, "list", skew=2.0)
    return make_problem(4, 300, (6000, 2), 8, False, "list", skew=0.0)


def main(library, case):
    _native.require("cpu")
    emulated = EmulatedCuda(library=library)
    p = problem(case)
    want = crl_op(p, "cpu", torch.float32, "instance", "relative", 5)
    for run in RUNS:
        try:
            with emulated.kernels(run):
                got = crl_op(p, "cpu", torch.float32, "instance", "relative", 5)
        except RuntimeError as error:
            print(f"ERROR: {error}")
            return 3
        exact = [name for name in Result._fields if name not in ("loss", "sums", "grad")]
        differ = [name for name in exact if not torch.equal(getattr(got, name), getattr(want, name))]
        if differ:
            print(f"MISMATCH: {run}: {', '.join(differ)}")
            return 4
    print("SAME")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
