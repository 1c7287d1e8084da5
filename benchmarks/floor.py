"""Arithmetic floors: how fast a step could be, from its operation counts and the rates of plain
vectorised loops measured in the same run.

Three rates are measured, on the CPU by the loops of benchmarks/floor.c (compiled here with the
system C compiler, -O3 -march=native -ffp-contract=off, for the compiler's preferred and for
512-bit vectors where the machine has them, the faster counting), on a GPU by plain torch
kernels:

- distance terms: (a_d - b_d)^2 added into a sum, per second, one anchor against a block of
  candidates (torch.cdist without the matrix-product shortcut on a GPU);
- exponentials per second (the C library's expf; torch.exp on a GPU);
- bytes per second read from a large array.

The work of one forward + backward of CRL (counts from its BatchStats):

- mining: instance level, anchors x B x D distance terms (every anchor against every candidate
  of its attribute); class level, B x (C_j + active classes) exponentials per attribute with an
  active class (the softmax normalisers and the probabilities ranked);
- the loss: 3 x pairs x D distance terms (the pair distances, and the gradient at both ends);
- memory: the features read and their gradient written, the logits read, partners and
  distances written.

The step's floor is max(arithmetic, memory), arithmetic the sum of its terms at their rates;
the mining floor is max(the mining's arithmetic, the features and logits it reads): for instance
mining the first (anchors x B x D terms, the issue's definition) except with very many classes,
where reading the logits for the predictions is the larger.
A measured time's fraction of its floor is floor / time (1 = at the floor). The distance loop is
also timed in every timing round of every case, next to the implementations, and a case's floors
use the median rate of those rounds: on a loaded machine the loop and the case see the same load.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
VECTOR_WIDTHS = ("", "-mprefer-vector-width=512")  # the compiler's choice, and 512-bit where it exists

# The measured loops' sizes: one block of candidates that stays in the first-level cache, as a
# mining kernel's would; a read of an array larger than any cache.
DIM, CANDIDATES, ANCHORS = 64, 256, 64
READ_BYTES = 256 * 2**20
EXP_COUNT = 1 << 16


@dataclass(frozen=True)
class Rates:
    distance_terms: float  # per second
    exps: float  # per second
    read_bytes: float  # per second
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Work:
    mining_terms: int  # distance terms of instance mining
    mining_exps: int  # exponentials of class mining
    loss_terms: int  # distance terms of the loss, forward and backward
    mining_bytes: int  # the features and logits mining reads
    bytes: int  # everything the step reads and writes


def _best_seconds(fn, seconds: float, at_least: int = 5) -> float:
    """The fastest of repeated calls, over about `seconds`."""
    fn()
    best, started, calls = float("inf"), time.perf_counter(), 0
    while calls < at_least or time.perf_counter() - started < seconds:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        calls += 1
    return best


def _compile(width_flag: str) -> Optional[str]:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join((compiler,) + FLAGS + (width_flag,)).encode()).hexdigest()[:16]
    target = os.path.join(tempfile.gettempdir(), f"crl_ops_floor_{key}.so")
    if not os.path.exists(target):
        partial = f"{target}.{os.getpid()}"
        command = [compiler, *FLAGS, *([width_flag] if width_flag else []), SOURCE, "-o", partial, "-lm"]
        if subprocess.run(command, capture_output=True).returncode != 0:
            return None
        os.replace(partial, target)
    return target


def _pointer(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


class DistanceLoop:
    """The plain distance loop as a call of fixed work (`terms` distance terms), to time next to the
    implementations: on the CPU the C loop of the fastest build, on a GPU torch.cdist."""

    def __init__(self, device: torch.device, library=None, anchors: int = ANCHORS):
        generator = torch.Generator().manual_seed(0)
        self.device = device
        if device.type == "cuda":
            self.a = torch.rand(4096, DIM, generator=generator).to(device)
            self.b = torch.rand(4096, DIM, generator=generator).to(device)
            self.terms = 4096 * 4096 * DIM
        else:
            self.library = library
            self.x = torch.rand(DIM, CANDIDATES, generator=generator)
            self.anchors = torch.rand(anchors, DIM, generator=generator)
            self.out = torch.empty(CANDIDATES)
            self.terms = anchors * DIM * CANDIDATES

    def __call__(self):
        if self.device.type == "cuda":
            return torch.cdist(self.a, self.b, compute_mode="donot_use_mm_for_euclid_dist")
        return self.library.crl_floor_distances(_pointer(self.x), _pointer(self.anchors), self.anchors.shape[0], DIM,
                                                CANDIDATES, _pointer(self.out))


_FASTEST_LIBRARY = {}  # the build of floor.c whose distance loop ran fastest, once measured


def _load(path: str):
    lib = ctypes.CDLL(path)
    for name in ("crl_floor_distances", "crl_floor_exp", "crl_floor_read"):
        getattr(lib, name).restype = ctypes.c_float
    return lib


def _cpu_rates(seconds: float) -> Optional[Rates]:
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(EXP_COUNT, generator=generator)
    big = torch.rand(READ_BYTES // 4, generator=generator)
    best, fastest = None, None
    for width in VECTOR_WIDTHS:
        path = _compile(width)
        if path is None:
            continue
        lib = _load(path)
        loop = DistanceLoop(torch.device("cpu"), lib)
        distances = loop.terms / _best_seconds(loop, seconds / 4)
        exps = EXP_COUNT / _best_seconds(lambda: lib.crl_floor_exp(_pointer(values), EXP_COUNT), seconds / 8)
        read = READ_BYTES / _best_seconds(lambda: lib.crl_floor_read(_pointer(big), big.numel()), seconds / 8, 3)
        if best is None or distances > best[0]:
            fastest = lib
        best = (distances, exps, read) if best is None else tuple(max(a, b) for a, b in zip(best, (distances, exps, read)))
    if best is None:
        return None
    _FASTEST_LIBRARY["cpu"] = fastest
    return Rates(*best, method="plain C loops (benchmarks/floor.c, " + " ".join(FLAGS[:3]) +
                 "; best of the compiler's vector width and 512-bit), one thread")


def distance_loop(device: torch.device) -> Optional[DistanceLoop]:
    """About 1 ms of the plain distance loop, after measure_rates (None without a C compiler)."""
    if device.type == "cuda":
        return DistanceLoop(device)
    library = _FASTEST_LIBRARY.get("cpu")
    return DistanceLoop(device, library, anchors=16 * ANCHORS) if library is not None else None


def _cuda_rates(device: torch.device, seconds: float) -> Rates:
    def timed(fn):
        def synced():
            fn()
            torch.cuda.synchronize(device)
        return _best_seconds(synced, seconds / 3)

    loop = DistanceLoop(device)
    distances = timed(loop)
    values = torch.rand(1 << 26, device=device)
    exps = timed(lambda: torch.exp(values))
    read = timed(lambda: values.sum())
    return Rates(loop.terms / distances, values.numel() / exps, values.numel() * 4 / read,
                 method="torch.cdist (no matrix product), torch.exp and torch.sum on the device")


def measure_rates(device: torch.device, seconds: float = 1.0) -> Optional[Rates]:
    """The three rates on `device`, or None where they cannot be measured (no C compiler)."""
    if device.type == "cuda":
        return _cuda_rates(device, seconds)
    return _cpu_rates(seconds)


def step_work(shape, mode: str, stats) -> Work:
    """The operation counts of one forward + backward, from the batch's shape and CRL's BatchStats."""
    counts = stats.pair_counts.cpu()
    anchors = counts[:, 0]
    pairs = int(counts[:, 1].sum() + counts[:, 2].sum())
    batch, dim, k = shape.batch_size, shape.dim, shape.k
    num_classes = torch.tensor(shape.num_classes)
    active = stats.active.cpu().sum(1)
    if mode == "instance":
        mining_terms, mining_exps = int(anchors.sum()) * batch * dim, 0
    else:
        mining_terms = 0
        mining_exps = int(((num_classes + active) * (active > 0)).sum()) * batch
    logits = batch * (shape.num_attributes if set(shape.num_classes) == {2} else int(num_classes.sum()))
    features = batch * shape.num_attributes * dim
    mined = batch * shape.num_attributes * 2 * k
    return Work(mining_terms, mining_exps, 3 * pairs * dim, 4 * (features + logits),
                4 * (2 * features + logits) + 12 * mined)


def floors(work: Work, rates: Rates, distance_terms: Optional[float] = None) -> dict:
    """Seconds: the mining's floor and the step's (forward + backward) floor, with its parts.
    `distance_terms`: the distance loop's rate measured next to this case, if it was."""
    terms_rate = distance_terms or rates.distance_terms
    mining_arithmetic = work.mining_terms / terms_rate + work.mining_exps / rates.exps
    arithmetic = mining_arithmetic + work.loss_terms / terms_rate
    memory = work.bytes / rates.read_bytes
    return {"mining": max(mining_arithmetic, work.mining_bytes / rates.read_bytes), "step": max(arithmetic, memory),
            "arithmetic": arithmetic, "memory": memory}
