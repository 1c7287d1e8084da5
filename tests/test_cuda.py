"""The CUDA kernels against the CPU kernels, on two devices: a GPU (tools/gpu_check.sh; skipped
without one) and the emulated CUDA device (tests/cuda_emulation.py), which runs the same kernels
and op glue on the CPU in every CI build. On the emulated device every computation runs once per
entry of cuda_emulation.RUNS (forward, reverse and seeded random thread and block orders, each
with its poison byte in shared memory and in every tensor an op allocates), and the runs must agree
bitwise, except where float atomics add in thread order. What only a GPU can show stays
GPU-only: CUDA graphs without host synchronisation, torch.compile(mode="reduce-overhead") and
device-side assertions that end the process.

The CPU kernels are the executable specification: on the same batch the CUDA ops must mine
bitwise the same sets, measure bitwise the same pair distances (both accumulate dimension by
dimension without FMA), and give losses, sums, histograms and gradients equal to rounding.
"""
import contextlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import crl_ops
from crl_ops import _native
from crl_ops._inputs import accumulation_dtype, normalise
from crl_ops.functional import margins_tensor

from torch.utils._pytree import tree_flatten

from .checks import gradcheck_crl
from .cuda_emulation import RUNS, EmulatedCuda
from .problems import FORMS, MODES, make_problem

VARIANTS = [(mode, form) for mode in MODES for form in FORMS]
REDUCTIONS = ("pooled", "attribute")


class Gpu:
    """A GPU: one run of each computation, on CUDA tensors."""

    name = "cuda"
    emulated = False
    device = torch.device("cuda")
    runs = (None,)

    @contextlib.contextmanager
    def kernels(self, run=None):
        yield


@pytest.fixture(scope="session")
def emulated_cuda():
    _native.require(torch.device("cpu"))  # the reference side, and the schemas the emulation takes over
    return EmulatedCuda()


def _real_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    _native.require(torch.device("cuda"))  # a missing CUDA build fails here, it is not skipped
    _native.require(torch.device("cpu"))
    return Gpu()


@pytest.fixture(params=["cuda", "emulated"])
def gpu(request):
    """The CUDA device under test: a GPU, or the emulated device."""
    return _real_gpu() if request.param == "cuda" else request.getfixturevalue("emulated_cuda")


@pytest.fixture
def real_gpu():
    return _real_gpu()


@pytest.fixture(scope="module")
def real_gpu_module():
    return _real_gpu()


@pytest.fixture(autouse=True)
def deterministic_off():
    yield
    torch.use_deterministic_algorithms(False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def on_device(gpu, compute, loose=(), runs=None):
    """compute() with the CUDA kernels of `gpu`. On the emulated device it runs once per entry of
    RUNS (or the first `runs`): every leaf of the results must be bitwise equal across the runs,
    except the leaves whose indices are in `loose` (float atomics add in thread order), which must
    agree to rounding. Returns the first run's results."""
    results = []
    for run in gpu.runs[:runs]:
        with gpu.kernels(run):
            results.append(compute())
    first, _ = tree_flatten(results[0])
    for run, result in zip(gpu.runs[1:], results[1:]):
        for index, (a, b) in enumerate(zip(first, tree_flatten(result)[0])):
            if not isinstance(a, torch.Tensor):
                assert a == b, f"{run}: output {index} differs from {gpu.runs[0]}"
            elif index in loose:
                tolerance = TOLERANCE[a.dtype][1]  # a gradient's tolerance against the CPU's
                scale = a.abs().nan_to_num(0.0).max().item() if a.numel() else 0.0
                torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance * scale, equal_nan=True)
            else:
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b)), \
                    f"{run}: output {index} differs from {gpu.runs[0]}"
    return results[0]


class Case(NamedTuple):
    name: str
    batch: int
    num_classes: tuple
    dim: int
    logit_format: str
    dtype: torch.dtype
    k: int
    bins: int = 100
    shared_features: bool = False
    mines: bool = True  # some anchor gets partners
    emulated_runs: int = len(RUNS)  # the runs of the emulated device (RUNS) the case takes


# Every feature dtype, binary, [B, A, C] and list logits (padded: entries past C_j unread), the
# register lists of the mining (K <= 64) and the general path (K > 64, and K = 1024), K above the
# candidates, B = 1, D = 1, B > 1024 and not a multiple of a tile (units of several chunks: the
# multi-block reductions), more attributes than a block has threads (the loops over attributes),
# histograms staged in shared memory (bins <= 512) and not, features shared by the attributes
# (stride 0), and more than 32 classes (a warp per row computes the softmax). 10^5 classes:
# test_hundred_thousand_classes.
CASES = [
    Case("binary-float32-k5", 300, (2,) * 6, 16, "binary", torch.float32, 5),
    Case("tensor3d-float64-k3-bins7", 200, (4,) * 3, 7, "tensor3d", torch.float64, 3, bins=7),
    Case("list-float16-k40", 400, (2, 5, 3), 33, "list", torch.float16, 40),
    Case("list-bfloat16-k100-bins1000", 500, (3, 2), 9, "list", torch.bfloat16, 100, bins=1000),
    Case("b1500-float32-k20", 1500, (2, 3), 40, "list", torch.float32, 20),
    # a profile block per attribute: the emulated device runs this one once, in forward order
    Case("a300-float32-k4", 40, (2,) * 300, 3, "binary", torch.float32, 4, emulated_runs=1),
    Case("shared-float64-k64", 260, (2, 3, 2), 12, "list", torch.float64, 64, shared_features=True),
    # more than 32 classes: the class softmax of a warp per row, bitwise the CPU's
    Case("many-classes-float32-k5", 600, (40, 70), 8, "list", torch.float32, 5),
    Case("b1-float32-k3", 1, (2, 3), 4, "list", torch.float32, 3, mines=False),
    Case("d1-float64-k50-over-candidates", 24, (2, 3), 1, "list", torch.float64, 50),
    Case("k1024-float32", 150, (2, 3), 6, "list", torch.float32, 1024),
]

# (loss, sums and histograms; gradients): the sums differ from the CPU's only in their order;
# half-precision gradients may round to the neighbouring value.
TOLERANCE = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4), torch.float16: (1e-5, 2e-3),
             torch.bfloat16: (1e-5, 1e-2)}


# The leaf of a Result that float atomics add to in thread order (the default backward).
ATOMIC_GRADIENT = (10,)


class Result(NamedTuple):
    loss: torch.Tensor
    counts: torch.Tensor
    minority: torch.Tensor
    active: torch.Tensor
    anchors: torch.Tensor
    partners: torch.Tensor
    pair_counts: torch.Tensor
    distances: torch.Tensor
    sums: torch.Tensor
    histograms: torch.Tensor
    grad: torch.Tensor


def problem_of(case: Case, seed: int):
    return make_problem(seed, case.batch, case.num_classes, case.dim, case.shared_features, case.logit_format,
                        skew=2.0, duplicates=3)


def crl_op(problem, device, dtype, mode, form, k, bins=100, reduction="pooled", validate=True) -> Result:
    """The crl_loss op on `device` and the gradient of its loss w.r.t. the API-format features."""
    features, logits, labels, _, _ = problem.inputs(dtype, device)
    batch = normalise(features, logits, labels)
    margins = margins_tensor(None, batch.num_classes, accumulation_dtype(dtype), torch.device(device))
    out = torch.ops.crl_ops.crl_loss(batch.features, batch.logits, batch.labels, batch.classes_tensor(), margins,
                                     mode, form, k, 1.0, bins, 0.5, reduction, validate)
    (grad,) = torch.autograd.grad(out[0], features)
    return Result(*(t.detach().cpu() for t in out), grad.cpu())


def by_partner(partners, distances):
    """Each half-row (positives, negatives) sorted by partner index, distances alongside: the
    order within a row is free (docs/semantics.md, section 2)."""
    k = partners.shape[-1] // 2
    halves = [(partners[..., :k], distances[..., :k]), (partners[..., k:], distances[..., k:])]
    sorted_halves = [(p.sort(-1), d) for p, d in halves]
    return (torch.cat([s.values for s, _ in sorted_halves], -1),
            torch.cat([d.gather(-1, s.indices) for s, d in sorted_halves], -1))


def assert_same_as_cpu(got: Result, want: Result, dtype):
    for name in ("counts", "minority", "active", "anchors", "pair_counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    got_partners, got_distances = by_partner(got.partners, got.distances)
    want_partners, want_distances = by_partner(want.partners, want.distances)
    assert torch.equal(got_partners, want_partners), "mined sets"
    assert torch.equal(got_distances, want_distances), "pair distances (no FMA on either side)"
    value_tol, grad_tol = TOLERANCE[dtype]
    for name in ("loss", "sums", "histograms"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=value_tol, atol=value_tol, msg=name)
    assert got.grad.dtype == dtype
    scale = max(want.grad.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.grad.double(), want.grad.double(), rtol=grad_tol, atol=grad_tol * scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode, form", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_cpu_kernels(case, mode, form, reduction, gpu):
    problem = problem_of(case, seed=10 * CASES.index(case) + VARIANTS.index((mode, form)))
    want = crl_op(problem, "cpu", case.dtype, mode, form, case.k, case.bins, reduction)
    got = on_device(gpu, lambda: crl_op(problem, gpu.device, case.dtype, mode, form, case.k, case.bins, reduction),
                    loose=ATOMIC_GRADIENT, runs=case.emulated_runs)
    assert (want.pair_counts[:, 1].sum() > 0) == case.mines, "the case mines something exactly when it should"
    assert_same_as_cpu(got, want, case.dtype)


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_deterministic_path_matches_cpu_kernels(mode, form, gpu):
    case = CASES[4]
    problem = problem_of(case, seed=5)
    want = crl_op(problem, "cpu", case.dtype, mode, form, case.k, case.bins)
    torch.use_deterministic_algorithms(True)
    got = on_device(gpu, lambda: crl_op(problem, gpu.device, case.dtype, mode, form, case.k, case.bins))
    assert_same_as_cpu(got, want, case.dtype)


def test_entries_past_num_classes_are_never_read(gpu):
    """[B, A, Cmax] logits with NaN past each attribute's C_j: validate=True must not see them."""
    problem = make_problem(9, 120, (3, 2, 4), 5, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(torch.float32, gpu.device)
    batch = normalise(features.detach(), logits, labels)
    padded = batch.logits.detach().clone()
    for j, classes in enumerate(batch.num_classes):
        padded[:, j, classes:] = math.nan
    margins = margins_tensor(None, batch.num_classes, torch.float32, features.device)
    ops = torch.ops.crl_ops
    args = (batch.features, padded, batch.labels, batch.classes_tensor(), margins, "instance", "relative", 5, 1.0,
            100, 0.5, "pooled", True)
    want = ops.crl_loss(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))[0]
    got = on_device(gpu, lambda: ops.crl_loss(*args)[0])
    assert torch.isfinite(got)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


# ---- gradients and determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_gradcheck(mode, form, gpu):
    # gradcheck also asserts that backward is reentrant (bitwise equal twice): the deterministic path.
    torch.use_deterministic_algorithms(True)
    problem = make_problem(21, 14, (2, 3), 3, False, "list", skew=1.5)
    features, logits, labels, _, _ = problem.inputs(torch.float64, gpu.device)
    crl = crl_ops.CRL(mode, form, k=3, bins=7, backend="native")
    with gpu.kernels(gpu.runs[0]):
        assert gradcheck_crl(crl, features, logits, labels)


def _feature_gradient(problem, mode, form, device, dtype=torch.float32):
    features, logits, labels, _, _ = problem.inputs(dtype, device)
    loss = crl_ops.CRL(mode, form, backend="native")(features, logits, labels)
    return torch.autograd.grad(loss, features)[0]


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_deterministic_mode_is_bitwise_reproducible(mode, form, gpu):
    problem = make_problem(31, 1100, (2, 3, 2), 24, False, "list", skew=2.0, duplicates=10)
    atomic = on_device(gpu, lambda: _feature_gradient(problem, mode, form, gpu.device), loose=(0,), runs=1)
    torch.use_deterministic_algorithms(True)
    runs = [on_device(gpu, lambda: _feature_gradient(problem, mode, form, gpu.device)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], atomic, rtol=1e-5, atol=1e-6 * atomic.abs().max().item())


@pytest.mark.parametrize("form", FORMS)
def test_forward_is_bitwise_reproducible(form, gpu):
    problem = make_problem(32, 1100, (2, 4), 20, False, "list", skew=2.0)
    first, second = (on_device(gpu, lambda: crl_op(problem, gpu.device, torch.float32, "instance", form, 9),
                               loose=ATOMIC_GRADIENT) for _ in range(2))
    for a, b in zip(first[:-1], second[:-1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", FORMS)
def test_margins_gradient_matches_cpu(form, gpu):
    problem = make_problem(33, 300, (2, 3, 5), 6, False, "list", skew=2.0)

    def gradients(device):
        features, logits, labels, _, _ = problem.inputs(torch.float64, device)
        margin = torch.tensor([0.4, 1.1, 0.7], dtype=torch.float64, device=device, requires_grad=True)
        loss = crl_ops.CRL("instance", form, margin=margin, backend="native")(features, logits, labels)
        return [g.cpu() for g in torch.autograd.grad(loss, (features, margin))]

    want = gradients("cpu")
    got = on_device(gpu, lambda: gradients(gpu.device), loose=(0,))  # the features' gradient: float atomics
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- validate=False and validate=True ------------------------------------------------------------------


def _small_batch():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, 3, 4, generator=g)
    logits = torch.randn(12, 3, 2, generator=g)
    labels = torch.tensor([[0, 0, 0]] * 8 + [[1, 1, 1]] * 4)
    return features, logits, labels


def _loss_and_grad(features, logits, labels, mode, form, gpu=None, validate=False):
    """The loss and its features' gradient on the CPU kernels, or on `gpu`'s CUDA kernels."""

    def compute(device):
        f = features.to(device).requires_grad_()
        loss = crl_ops.CRL(mode, form, backend="native", validate=validate)(f, logits.to(device), labels.to(device))
        return loss.detach().cpu(), torch.autograd.grad(loss, f)[0].cpu()

    return compute("cpu") if gpu is None else on_device(gpu, lambda: compute(gpu.device), loose=(1,))


@pytest.mark.parametrize("mode, form", VARIANTS)
@pytest.mark.parametrize("where", ["features-nan", "features-inf", "logits-nan", "features-overflow"])
def test_unchecked_non_finite_values_give_nan(where, mode, form, gpu):
    features, logits, labels = _small_batch()
    if where == "features-nan":
        features[3, 1, 2] = math.nan
    elif where == "features-inf":
        features[0, 0, 0] = math.inf
    elif where == "logits-nan":
        logits[1, 0, 1] = math.nan
    else:
        features = features * 1e20  # squared distances overflow float32
    loss, grad = _loss_and_grad(features, logits, labels, mode, form, gpu)
    assert torch.isnan(loss) and torch.isnan(grad).all()


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_unchecked_out_of_range_labels_are_not_annotated(mode, form, gpu):
    features, logits, labels = _small_batch()
    bad = labels.clone()
    bad[2, 0], bad[3, 1], bad[9, 2] = -2, 7, -100
    cleaned = bad.clone()
    cleaned[2, 0] = cleaned[3, 1] = cleaned[9, 2] = -1
    got = _loss_and_grad(features.double(), logits.double(), bad, mode, form, gpu)
    for want in (_loss_and_grad(features.double(), logits.double(), cleaned, mode, form, gpu),
                 _loss_and_grad(features.double(), logits.double(), bad, mode, form)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


ASSERTION_SCRIPT = textwrap.dedent(
    """
    import math, sys
    import torch
    import crl_ops
    from tests.test_cuda import run_case

    case = sys.argv[1]
    run_case(case, torch.device("cuda"))
    torch.cuda.synchronize()
    print("no assertion")
    """
)


def run_case(case, device):
    """One bad value of validate=True (ASSERTIONS) on `device`."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, 2, 4, generator=g)
    logits = torch.randn(12, 2, generator=g)
    labels = torch.tensor([[0, 0]] * 8 + [[1, 1]] * 4)
    if case == "features":
        features[3, 1, 2] = math.nan
    elif case == "logits":
        logits[1, 0] = math.nan
    elif case == "labels":
        labels[2, 1] = 5
    else:
        features = features * 1e20
    features, logits, labels = features.to(device), logits.to(device), labels.to(device)
    if case == "mined-overflow":  # the mining op on its own checks the mined pairs
        classes = torch.tensor([2, 2], device=device)
        _, _, active = torch.ops.crl_ops.profile(labels, classes, 2, 0.5, True)
        torch.ops.crl_ops.mine_instance(features, logits, labels, classes, active, 3, 0, 12, True)
    else:
        crl_ops.CRL()(features, logits, labels)
ASSERTIONS = {
    "features": "features contain NaN or inf",
    "logits": "logits contain NaN or inf",
    "labels": "is out of range for attribute",
    "overflow": "the squared distance of a mined pair overflows float32",
    "mined-overflow": "the squared distance of a mined pair overflows float32",
}


@pytest.fixture(scope="module")
def assertion_runs(real_gpu_module):
    """Each case in a fresh process, as an assertion poisons the CUDA context; all at once."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), *sys.path]))
    started = {case: subprocess.Popen([sys.executable, "-c", ASSERTION_SCRIPT, case], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env) for case in ASSERTIONS}
    return {case: (process.communicate(timeout=300), process.returncode) for case, process in started.items()}


@pytest.mark.parametrize("case", list(ASSERTIONS))
def test_validate_is_a_device_side_assertion(case, assertion_runs):
    (stdout, stderr), returncode = assertion_runs[case]
    output = stdout + stderr  # the device prints the failed assertion; Python raises on stderr
    assert returncode != 0 and "no assertion" not in stdout, output[-2000:]
    assert "device-side assert" in stderr, stderr[-2000:]
    assert ASSERTIONS[case] in output, output[-2000:]


@pytest.mark.parametrize("case", list(ASSERTIONS))
def test_validate_is_an_emulated_device_side_assertion(case, emulated_cuda):
    """The emulated device stops the launch at the failed assertion and raises with its line."""
    for run in emulated_cuda.runs:
        with emulated_cuda.kernels(run), pytest.raises(RuntimeError, match="device-side assert triggered") as raised:
            run_case(case, emulated_cuda.device)
        assert ASSERTIONS[case].split(" for attribute")[0].replace("is out of range", "out of range") in str(raised.value)
        assert "Assertion `crl_ops:" in str(raised.value) and ".cu:" in str(raised.value)


# ---- the pair ops of distributed=True ---------------------------------------------------------------------


def _pair_ops(vectors, partners, first, margins, form, bins, weights):
    """distances, overflow, sums and the gradients of (sums * weights).sum() w.r.t. vectors and margins."""
    ops = torch.ops.crl_ops
    d, overflow = ops.pair_distances(vectors, partners, first)
    longest = crl_ops.reference.longest_distance(d, partners) if form == "distribution" else None
    sums = ops.pair_sums(d, partners, margins, longest, form, 1.5, bins)
    grads = torch.autograd.grad((sums * weights.to(sums)).sum(), (vectors, margins))
    return [t.detach().cpu() for t in (d, overflow, sums, *grads)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", [c for c in CASES if c.k <= 64 and len(c.num_classes) <= 6 and c.mines],
                         ids=lambda c: c.name)
def test_pair_ops_match_cpu_kernels(case, form, gpu):
    """A rank's own anchors (rows 10..10 + B/2) against gathered vectors, [N, A, D] or shared [N, 1, D]:
    bitwise the CPU's distances and sums (same order), gradients equal to rounding."""
    problem = problem_of(case, seed=3)

    def compute(device):
        features, logits, labels, _, _ = problem.inputs(case.dtype, device)
        batch = normalise(features, logits, labels)
        classes = batch.classes_tensor()
        _, _, active = torch.ops.crl_ops.profile(batch.labels, classes, batch.max_classes, 0.5, True)
        rows = case.batch // 2
        partners = torch.ops.crl_ops.mine_instance(batch.features.detach(), batch.logits.detach(), batch.labels,
                                                   classes, active, case.k, 10, rows, True)[1]
        vectors = (batch.features[:, :1] if case.shared_features else batch.features).detach().requires_grad_()
        margins = torch.linspace(0.5, 2.0, len(case.num_classes), device=device,
                                 dtype=accumulation_dtype(case.dtype)).requires_grad_()
        shape = (len(case.num_classes), 2, case.bins) if form == "distribution" else (len(case.num_classes), 2)
        weights = torch.linspace(-1.0, 2.0, math.prod(shape), dtype=torch.float64).view(shape).to(device)
        return partners.cpu(), _pair_ops(vectors, partners, 10, margins, form, case.bins, weights)

    cpu_partners, want = compute("cpu")
    # the vectors' gradient adds with float atomics (leaf 4: partners, then distances, overflow, sums, it)
    cuda_partners, got = on_device(gpu, lambda: compute(gpu.device), loose=(4,))
    assert torch.equal(cuda_partners, cpu_partners)
    assert torch.equal(got[0], want[0]), "pair distances"
    assert torch.equal(got[1], want[1]), "overflow flag"
    assert torch.equal(got[2], want[2]), "sums (the same order of additions)"
    value_tol, grad_tol = TOLERANCE[case.dtype]
    for got_grad, want_grad in zip(got[3:], want[3:]):
        scale = max(want_grad.abs().max().item(), 1e-30)
        torch.testing.assert_close(got_grad.double(), want_grad.double(), rtol=grad_tol, atol=grad_tol * scale)


@pytest.mark.parametrize("active", [False, True], ids=["every-class", "active-classes"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_class_lists_match_cpu_kernels(case, active, gpu):
    """The class lists (distributed=True builds class mode's partner table from them), bitwise the
    CPU's: of every class, and of the profile's active classes alone (empty lists elsewhere)."""
    problem = problem_of(case, seed=5)

    def compute(device):
        features, logits, labels, _, _ = problem.inputs(case.dtype, device)
        batch = normalise(features, logits, labels)
        classes = batch.classes_tensor()
        wanted = torch.ops.crl_ops.profile(batch.labels, classes, batch.max_classes, 0.5, True)[2] if active else None
        return [t.cpu() for t in torch.ops.crl_ops.class_lists(batch.logits.detach(), batch.labels, classes, wanted,
                                                                 case.k, True)]

    want_keys, want_lists = compute("cpu")
    got_keys, got_lists = on_device(gpu, lambda: compute(gpu.device), runs=case.emulated_runs)
    assert torch.equal(got_lists, want_lists)
    assert torch.equal(got_keys, want_keys)


def _distributed_steps(case, problem, device, partner_rows):
    """One rank's steps of distributed=True on rows 10..10 + B/2 of the batch (the whole batch
    gathered): what was mined, the distances, the partial sums, the loss and its gradients."""
    ops = torch.ops.crl_ops
    features, logits, labels, _, _ = problem.inputs(case.dtype, device)
    batch = normalise(features, logits, labels)
    classes = batch.classes_tensor()
    vectors = (batch.features[:, :1] if case.shared_features else batch.features).detach()
    first, rows = 10, case.batch // 2
    own = vectors[first:first + rows].contiguous().requires_grad_()
    mode = "class" if partner_rows else "instance"
    checked = own.detach().expand(-1, len(case.num_classes), -1)  # class mode checks the rank's own rows
    mined = ops.shard_mine(checked if partner_rows else batch.features.detach(), batch.logits.detach(), batch.labels,
                           classes, mode, case.k, 0.5, first, rows, partner_rows, True)
    _, _, _, anchors, partners, checks, lists = mined
    margins = torch.linspace(0.5, 2.0, len(case.num_classes), device=device, dtype=accumulation_dtype(case.dtype))
    if partner_rows:
        table = ops.shard_table(own.detach(), lists, first)
        d, overflow, longest = ops.table_distances(own.detach(), table, partners)
        d.requires_grad_()
    else:
        gathered = vectors.clone().requires_grad_()
        d, overflow = ops.pair_distances(gathered, partners, first)
        longest = d.detach().amax((0, 2))
    # the histogram form: its longest distances and histograms too
    partial = ops.shard_sums(d, partners, anchors, margins, longest, overflow, checks, "distribution", 1.0, case.bins)
    loss, pair_counts, grad_scale = ops.shard_loss(partial, len(case.num_classes), "distribution", case.bins,
                                                   "pooled", d.dtype, 2, True)
    if partner_rows:
        (grad_d,) = torch.autograd.grad(loss, d)
        grad_rows, grad_table = ops.table_distances_backward(grad_d, own.detach(), table, partners, d.detach())
        grad = ops.shard_table_backward(grad_table, grad_rows, lists, first, grad_scale)
    else:
        (grad,) = torch.autograd.grad(loss, gathered)
    return [t.detach().cpu() for t in (*mined, d, overflow, partial, loss, pair_counts, grad_scale, grad)]


@pytest.mark.parametrize("partner_rows", [False, True], ids=["instance", "class-partner-rows"])
@pytest.mark.parametrize("case", [c for c in CASES if c.k <= 64 and len(c.num_classes) <= 6 and c.mines],
                         ids=lambda c: c.name)
def test_distributed_steps_match_cpu_kernels(case, partner_rows, gpu):
    """shard_mine, the distances, shard_sums and shard_loss of a rank: bitwise the CPU's mining,
    distances and partial sums (same order), the loss and the rows' gradient equal to rounding."""
    problem = problem_of(case, seed=7)
    want = _distributed_steps(case, problem, "cpu", partner_rows)
    got = on_device(gpu, lambda: _distributed_steps(case, problem, gpu.device, partner_rows), loose=(13,))
    for index in range(10):  # counts, minority, active, anchors, partners, checks, lists, d, overflow, partial
        assert torch.equal(got[index], want[index]), index
    value_tol, grad_tol = TOLERANCE[case.dtype]
    torch.testing.assert_close(got[10], want[10], rtol=value_tol, atol=value_tol)
    assert torch.equal(got[11], want[11]) and torch.equal(got[12], want[12])
    scale = max(want[13].abs().max().item(), 1e-30)
    torch.testing.assert_close(got[13].double(), want[13].double(), rtol=grad_tol, atol=grad_tol * scale)


def _summed_partial(form, attributes, bins, seed):
    """A summed partial vector (op_schemas.h): random sums and pair counts, attribute 0 without
    positive pairs and attribute 1 without any pair, no flag set."""
    g = torch.Generator().manual_seed(seed)
    shape = (attributes, 2, bins) if form == "distribution" else (attributes, 2)
    sums = torch.rand(shape, generator=g, dtype=torch.float64) * 5
    counts = torch.randint(0, 40, (attributes, 4), generator=g).double()
    counts[0, 1] = 0
    counts[1] = 0
    return torch.cat([sums.flatten(), counts.flatten(), torch.zeros(3, dtype=torch.float64)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FORMS)
def test_shard_loss_is_bitwise_the_cpus(form, reduction, dtype, gpu):
    """The finishing step runs the same per-attribute code (common/shard_loss.h) on both devices:
    the loss, pair counts, gradient scale and the partial vector's gradient are bitwise the CPU's.
    A set flag makes them NaN; with validate it is an assertion naming its check."""
    ops = torch.ops.crl_ops
    attributes, bins = 5, 7
    total = _summed_partial(form, attributes, bins, seed=3)

    def step(device, partial, validate=True):
        partial = partial.to(device)
        loss, pair_counts, grad_scale = ops.shard_loss(partial, attributes, form, bins, reduction, dtype, 3, validate)
        grad = ops.shard_loss_backward(torch.tensor(0.75, dtype=dtype, device=device), partial, attributes, form, bins,
                                       reduction, dtype)
        return [t.cpu() for t in (loss, pair_counts, grad_scale, grad)]

    want = step("cpu", total)
    got = on_device(gpu, lambda: step(gpu.device, total))
    for index, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), index
    assert not torch.isnan(want[0]) and want[2].item() == 3.0
    for flag, message in ((1, "logits contain NaN"), (2, "features contain NaN"), (0, "pair overflows float")):
        flagged = total.clone()
        flagged[-3 + flag] = 1.0
        loss, _, grad_scale, grad = on_device(gpu, lambda: step(gpu.device, flagged, validate=False))
        assert torch.isnan(loss) and torch.isnan(grad_scale) and torch.isnan(grad).all()
        if gpu.emulated:  # on a GPU the assertion would end the process (test_validate_is_a_device_side_assertion)
            with gpu.kernels(), pytest.raises(RuntimeError, match="device-side assert triggered") as raised:
                step(gpu.device, flagged)
            assert message in str(raised.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", [False, True], ids=["per-attribute", "shared"])
def test_partner_table_is_bitwise_the_cpus(shared, dtype, gpu):
    """Class mode's partner table and its gradient (rows 4..10 of a batch of 14, strided vectors,
    empty slots and rows of other ranks among the lists): bitwise the CPU's, which are the
    reference's table and its gradient to rounding."""
    ops = torch.ops.crl_ops
    g = torch.Generator().manual_seed(5)
    attributes, classes, k, dim, rows, first = 3, 3, 2, 5, 7, 4
    lists = torch.randint(-1, 14, (attributes, classes, 2 * k), generator=g)
    columns = 1 if shared else attributes
    vectors = torch.randn(rows, columns, 2 * dim, generator=g).to(dtype)[..., ::2]
    grad_table = torch.randn(classes * 2 * k, attributes, dim, generator=g).to(dtype)
    grad_rows = torch.randn(rows, columns, dim, generator=g).to(dtype)
    scale = torch.tensor(2.0)

    def step(device):
        table = ops.shard_table(vectors.to(device), lists.to(device), first)
        grad = ops.shard_table_backward(grad_table.to(device), grad_rows.to(device), lists.to(device), first,
                                        scale.to(device))
        return [table.cpu(), grad.cpu()]

    want = step("cpu")
    got = on_device(gpu, lambda: step(gpu.device))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    assert torch.equal(want[0], crl_ops.reference.shard_table(vectors, lists, first))
    expected = crl_ops.reference.shard_table_backward(grad_table, grad_rows, lists, first, scale)
    torch.testing.assert_close(want[1], expected, **({"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {}))


# ATen operations that run no kernel on a GPU: allocations, views and metadata. Any other ATen
# operation an op calls is at least one kernel there.
NO_KERNEL = frozenset(
    f"aten::{name}" for name in (
        "empty", "empty_strided", "empty_like", "as_strided", "view", "_unsafe_view", "_reshape_alias", "reshape",
        "narrow", "slice", "select", "expand", "unsqueeze", "squeeze", "permute", "transpose", "t", "alias",
        "detach", "lift_fresh", "contiguous", "to", "resize_", "unbind", "split", "result_type"))


def stream_work(gpu, compute) -> dict:
    """What compute() puts on the emulated device's stream, by op: the emulator's kernel launches
    and memsets, and the ATen operations that the ops' glue calls (`NO_KERNEL` aside)."""
    aten = {}

    def walk(event, op):
        if op is not None and event.name.startswith("aten::") and event.name not in NO_KERNEL:
            aten[f"{op} {event.name}"] = aten.get(f"{op} {event.name}", 0) + 1
            return  # its own calls are part of it
        for child in event.cpu_children:
            walk(child, event.name if event.name.startswith("crl_ops") else op)

    before = gpu.statistics()
    with gpu.kernels(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        compute()
    after = gpu.statistics()
    for event in profile.events():
        if event.cpu_parent is None:
            walk(event, None)
    return {"launches": after["launches"] - before["launches"], "memsets": after["memsets"] - before["memsets"],
            "aten": aten}


@pytest.mark.parametrize("partner_rows,bound", [(False, 19), (True, 25)], ids=["instance", "class-partner-rows"])
def test_a_rank_step_puts_few_kernels_on_the_stream(emulated_cuda, partner_rows, bound):
    """A rank's ops under distributed=True (forward and backward, the histogram form) are their
    own kernels (12 launches, 14 with the partner table, and 2 memsets); the ATen operations left
    in their glue are the zero fills of gradients that kernels add into, the partial gradient's
    conversion, and class mode's join of [own rows; table] with its longest distances."""
    case = CASES[0]
    work = stream_work(emulated_cuda, lambda: _distributed_steps(case, problem_of(case, seed=7), "cpu", partner_rows))
    total = work["launches"] + work["memsets"] + sum(work["aten"].values())
    assert total <= bound, work


def test_pair_distances_backward_refuses_deterministic_mode(gpu):
    vectors = torch.randn(8, 2, 3, device=gpu.device, requires_grad=True)
    partners = torch.tensor([[[1, 2], [3, -1]]], device=gpu.device)
    with gpu.kernels(gpu.runs[0]):
        d, _ = torch.ops.crl_ops.pair_distances(vectors, partners, 0)
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="pair_distances_backward"):
            d.sum().backward()


# ---- op registration, CUDA graphs, torch.compile --------------------------------------------------------


def _op_samples(device):
    """One call of each op on `device`: bfloat16 features, binary logits, K in 17..64."""
    problem = make_problem(50, 60, (2, 2), 5, False, "binary", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(torch.bfloat16, device)
    batch = normalise(features, logits, labels)
    classes = batch.classes_tensor()
    x = batch.features.detach().requires_grad_()
    ops = torch.ops.crl_ops
    _, _, active = ops.profile(batch.labels, classes, 2, 0.5, True)
    margins = torch.full((2,), 0.7, device=device, requires_grad=True)
    samples = [
        (ops.profile.default, (batch.labels, classes, 2, 0.5, True)),
        (ops.mine_class.default, (batch.logits.detach(), batch.labels, classes, active, 20, 0, 60, True)),
        (ops.mine_instance.default, (x.detach(), batch.logits.detach(), batch.labels, classes, active, 20, 10, 30,
                                     True)),
    ]
    # The distribution form: every output of the loss op has entries (the histograms too).
    args = (x, batch.logits.detach(), batch.labels, classes, margins, "instance", "distribution", 20, 1.0, 10, 0.5,
            "pooled", True)
    samples.append((ops.crl_loss.default, args))
    loss, _, _, _, _, partners, counts, d, sums, hist = ops.crl_loss(*args)
    grad = torch.ones((), device=device)
    samples.append((ops.crl_loss_backward.default, (grad, loss.detach(), x.detach(), partners, d, margins.detach(),
                                                     counts, sums, hist, "distribution", 1.0, 10, "pooled", True)))
    samples.append((ops.class_lists.default, (batch.logits.detach(), batch.labels, classes, active, 20, True)))
    own = ops.mine_instance(x.detach(), batch.logits.detach(), batch.labels, classes, active, 20, 10, 30, True)[1]
    pair_d, _ = ops.pair_distances(x, own, 10)
    samples += [(ops.pair_distances.default, (x, own, 10)),
                (ops.pair_distances_backward.default, (torch.randn_like(pair_d), x.detach(), own, pair_d.detach(), 10))]
    longest = crl_ops.reference.longest_distance(pair_d, own)
    for form in FORMS:
        args = (pair_d.detach().requires_grad_(), own, margins, longest if form == "distribution" else None, form, 1.0,
                10)
        samples.append((ops.pair_sums.default, args))
        upstream = torch.randn_like(ops.pair_sums(*args))
        samples.append((ops.pair_sums_backward.default,
                        (upstream, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args], True)))
    return samples


def test_opcheck(gpu):
    with gpu.kernels(gpu.runs[0]):
        for op, args in _op_samples(gpu.device):
            torch.library.opcheck(op, args)


def test_hundred_thousand_classes(gpu):
    """C_j = 10^5 beside a binary attribute: the profile's counts outside shared memory (its search
    over the nonzero counts), a warp per row for the logits, class lists of mostly inactive
    classes; profile and both minings bitwise the CPU's."""
    g = torch.Generator().manual_seed(80)
    batch, classes = 64, 100_000
    labels = torch.stack([torch.randint(0, 40, (batch,), generator=g) * 2500, torch.randint(0, 2, (batch,), generator=g)], 1)
    logits = torch.randn(batch, 2, classes, generator=g)
    features = torch.randn(batch, 2, 3, generator=g)
    num_classes = torch.tensor([classes, 2])
    ops = torch.ops.crl_ops

    def compute(device):
        z, y, c, x = logits.to(device), labels.to(device), num_classes.to(device), features.to(device)
        counts, minority, active = ops.profile(y, c, classes, 0.5, True)
        return [t.cpu() for t in (counts, minority, active, *ops.mine_class(z, y, c, active, 3, 0, batch, True),
                                  *ops.mine_instance(x, z, y, c, active, 3, 0, batch, True))]

    want = compute("cpu")
    assert want[2][0].any() and want[2][1].any(), "both attributes have active classes"
    for a, b in zip(on_device(gpu, lambda: compute(gpu.device), runs=1), want):
        assert torch.equal(a, b)


def _celeba_like(seed, device="cuda"):
    """B=128, A=40 binary attributes, D=64: the paper's CelebA step."""
    problem = make_problem(seed, 128, (2,) * 40, 64, False, "binary", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(torch.float32, device)
    return features, logits, labels


def test_cuda_graph_replay_equals_eager_and_never_syncs(real_gpu):
    features, logits, labels = _celeba_like(60)
    crl = crl_ops.CRL()

    def step():
        loss = crl(features, logits, labels)
        return loss, torch.autograd.grad(loss, features)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss, captured_grad = step()
    for seed in (61, 62):  # new values in the captured inputs
        new_features, new_logits, new_labels = _celeba_like(seed)
        with torch.no_grad():
            features.copy_(new_features)
            logits.copy_(new_logits)
            labels.copy_(new_labels)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
            eager_loss, eager_grad = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(captured_loss, eager_loss)  # the forward has no atomics
        torch.testing.assert_close(captured_grad, eager_grad, rtol=1e-5, atol=1e-7)
        assert eager_loss > 0


def test_compile_reduce_overhead(real_gpu):
    crl = crl_ops.CRL()
    compiled = torch.compile(crl, mode="reduce-overhead", fullgraph=True)
    for seed in (70, 71, 72, 73):
        features, logits, labels = _celeba_like(seed)
        loss = compiled(features, logits, labels)
        grad = torch.autograd.grad(loss, features)[0].clone()
        loss = loss.detach().clone()
        want = crl(features, logits, labels)
        torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, torch.autograd.grad(want, features)[0], rtol=1e-5, atol=1e-7)
