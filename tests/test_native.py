"""The native kernels (CPU, and CUDA where a GPU is present) against the reference and the oracle."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crl_ops
from crl_ops import _native, reference
from crl_ops._inputs import accumulation_dtype
from crl_ops.loss import _margins

from .problems import FORMS, MODES, make_problem, problems
from .test_reference import check_against_oracle, gradcheck_crl

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
LOW_PRECISION = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(params=DEVICES)
def device(request):
    _native.require(torch.device(request.param))  # a missing build fails here, it is not skipped
    return request.param


def run_both(problem, mode, form, k, device, dtype, bins=100):
    """Mines with each backend, then evaluates both losses on the reference's pairs."""
    features, logits, labels, _, _ = problem.inputs(dtype, device)
    result = {}
    for backend in ("reference", "native"):
        crl = crl_ops.CRL(mode=mode, form=form, k=k, bins=bins, backend=backend)
        crl(features, logits, labels)
        result[backend] = crl._last
    return features, result


def assert_same_selection(features, native, ref, mode, tolerance):
    """Equal anchors; equal mined sets, up to candidates whose keys tie within `tolerance`."""
    assert torch.equal(native.anchors, ref.anchors)
    k = ref.partners.shape[-1] // 2
    got, want = native.partners.cpu(), ref.partners.cpu()
    if mode == "class" or tolerance == 0:
        assert [set(r) for r in got.view(-1, k).tolist()] == [set(r) for r in want.view(-1, k).tolist()]
        return
    # Instance mining: where sets differ, the distances of the two selections must agree.
    x = features.detach().double().cpu()
    if x.dim() == 2:
        x = x[:, None].expand(-1, got.shape[1], -1)
    for i, j in (got.sort(-1).values != want.sort(-1).values).any(-1).nonzero().tolist():
        for half in (slice(0, k), slice(k, 2 * k)):
            a, b = got[i, j, half], want[i, j, half]
            assert (a >= 0).sum() == (b >= 0).sum()
            da = (x[a[a >= 0], j] - x[i, j]).norm(dim=-1).sort().values
            db = (x[b[b >= 0], j] - x[i, j]).norm(dim=-1).sort().values
            torch.testing.assert_close(da, db, rtol=tolerance, atol=tolerance)


def assert_same_losses(features, partners, form, num_classes, bins, dtype):
    """The loss op of both backends on the same pairs: values and feature gradients."""
    values, grads = [], []
    for backend in (reference, _native):
        f = features.detach().clone().requires_grad_()
        batch_features = f if f.dim() == 3 else f[:, None].expand(-1, partners.shape[1], -1)
        if form == "relative":
            margins = _margins(None, num_classes, accumulation_dtype(dtype), f.device)
            loss = backend.relative_loss(batch_features, partners, margins)
        elif form == "absolute":
            loss = backend.absolute_loss(batch_features, partners, 1.0)
        else:
            loss = backend.distribution_loss(batch_features, partners, bins)
        loss.backward()
        values.append(loss.detach())
        grads.append(f.grad)
    tol = LOW_PRECISION[dtype] if dtype != torch.float64 else 1e-10
    torch.testing.assert_close(values[1], values[0], rtol=tol, atol=tol)
    assert grads[1].dtype == dtype
    torch.testing.assert_close(grads[1].double(), grads[0].double(), rtol=tol, atol=tol)


# ---- against the float64 oracle -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problem=problems(), mode=st.sampled_from(MODES), form=st.sampled_from(FORMS), k=st.integers(1, 6),
       bins=st.sampled_from([2, 5, 100]))
def test_native_matches_oracle(device, problem, mode, form, k, bins):
    check_against_oracle(problem, mode, form, k, bins=bins, backend="native", device=device)


# ---- against the reference, larger batches, every dtype ------------------------------------------------


@st.composite
def large_problems(draw):
    attributes = draw(st.integers(1, 5))
    big = draw(st.integers(0, 5)) == 0
    return make_problem(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch_size=draw(st.integers(800, 3000) if big else st.integers(30, 400)),
        num_classes=tuple(draw(st.lists(st.integers(2, 8), min_size=attributes, max_size=attributes))),
        dim=draw(st.integers(1, 48)),
        shared_features=draw(st.booleans()),
        logit_format="list",
        unannotated=draw(st.sampled_from([0.0, 0.2])),
        skew=draw(st.sampled_from([1.0, 2.5])),
        duplicates=draw(st.integers(0, 4)),
    )


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problem=large_problems(), mode=st.sampled_from(MODES), form=st.sampled_from(FORMS),
       k=st.sampled_from([1, 3, 5, 9, 20]), dtype=st.sampled_from([torch.float64, torch.float32, torch.float16,
                                                                    torch.bfloat16]))
def test_native_matches_reference(device, problem, mode, form, k, dtype):
    features, result = run_both(problem, mode, form, k, device, dtype)
    native, ref = result["native"], result["reference"]
    assert torch.equal(native.counts, ref.counts)
    assert torch.equal(native.minority, ref.minority) and torch.equal(native.active, ref.active)
    assert_same_selection(features, native, ref, mode, 0 if dtype == torch.float64 else 1e-5)
    assert_same_losses(features, ref.partners, form, problem.num_classes, 100, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_k_above_register_lists(device, mode):
    """K > 32 takes the kernels' general path."""
    problem = make_problem(7, 300, (2, 5), 6, False, "list", skew=1.5)
    features, result = run_both(problem, mode, "relative", 40, device, torch.float64)
    assert_same_selection(features, result["native"], result["reference"], mode, 0)


def test_noncontiguous_and_shared_features(device):
    problem = make_problem(12, 200, (2, 3, 4), 16, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    strided = features.detach().transpose(0, 1).contiguous().transpose(0, 1)  # [B, A, D] with A outermost
    shared = features.detach()[:, 0]  # [B, D], expanded with stride 0 inside
    for f in (strided, shared, features.detach()[:, :, ::2]):
        for mode in MODES:
            ref = crl_ops.CRL(mode=mode, backend="reference")(f, logits, labels)
            nat = crl_ops.CRL(mode=mode, backend="native")(f, logits, labels)
            torch.testing.assert_close(nat, ref, rtol=1e-10, atol=1e-12)


# ---- gradients, determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(device, mode, form):
    problem = make_problem(21, 14, (2, 3), 3, False, "list", skew=1.5)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    crl = crl_ops.CRL(mode=mode, form=form, k=3, bins=7, backend="native")
    # gradcheck also asserts that backward is reentrant (bitwise equal twice): on CUDA that
    # needs the deterministic (atomic-free) backward.
    torch.use_deterministic_algorithms(device == "cuda")
    try:
        assert gradcheck_crl(crl, features, logits, labels)
    finally:
        torch.use_deterministic_algorithms(False)


def _feature_gradient(problem, mode, form, device, dtype=torch.float32):
    features, logits, labels, _, _ = problem.inputs(dtype, device)
    loss = crl_ops.CRL(mode=mode, form=form, backend="native")(features, logits, labels)
    return torch.autograd.grad(loss, features)[0]


@pytest.mark.parametrize("form", FORMS)
def test_cpu_gradients_bitwise_reproducible(form):
    _native.require(torch.device("cpu"))
    problem = make_problem(30, 600, (2, 3, 2), 24, False, "list", skew=2.0)
    threads = torch.get_num_threads()
    try:
        runs = [_feature_gradient(problem, "instance", form, "cpu")]
        runs.append(_feature_gradient(problem, "instance", form, "cpu"))
        torch.set_num_threads(1)
        runs.append(_feature_gradient(problem, "instance", form, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("form", FORMS)
def test_cuda_deterministic_mode(form):
    problem = make_problem(31, 2000, (2, 3, 2), 24, False, "list", skew=2.0)
    atomic = _feature_gradient(problem, "instance", form, "cuda")
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_feature_gradient(problem, "instance", form, "cuda") for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    torch.testing.assert_close(runs[0], atomic, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_mines_exactly_as_cpu(mode):
    """Both backends accumulate distances in the same order without FMA: identical selections."""
    problem = make_problem(40, 1500, (2, 6, 3), 40, False, "list", skew=2.0, duplicates=20)
    mined = []
    for device in ("cpu", "cuda"):
        features, logits, labels, _, _ = problem.inputs(torch.float32, device)
        m = crl_ops.mine(features, logits, labels, mode=mode, k=7, backend="native")
        mined.append(m)
    for a, b in zip(mined[0], mined[1]):
        b = b.cpu()
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            assert torch.equal(a.sort(-1).values, b.sort(-1).values)


# ---- op registration ---------------------------------------------------------------------------------------


def _op_samples(device):
    problem = make_problem(50, 40, (2, 3), 5, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    batch = crl_ops.loss.normalise(features, logits, labels)
    counts, minority, active = _native.profile(batch.labels, batch.max_classes)
    scores = torch.softmax(batch.logits.detach(), -1)
    predictions = batch.logits.detach().argmax(-1)
    x = features.detach().requires_grad_()
    _, partners = _native.mine_instance(x, predictions, batch.labels, active, 3)
    margins = torch.full((2,), 0.7, dtype=torch.float64, device=device)
    ops = torch.ops.crl_ops
    _, d, triplets = ops.relative_loss(x, partners, margins)
    _, _, pairs = ops.absolute_loss(x, partners, 1.0)
    _, _, hist, scale, pair_counts = ops.distribution_loss(x, partners, 10)
    grad = torch.ones((), dtype=torch.float64, device=device)
    x0 = x.detach()
    return [
        (ops.profile.default, (batch.labels, batch.max_classes)),
        (ops.mine_class.default, (scores, batch.labels, active, 3)),
        (ops.mine_instance.default, (x0, predictions, batch.labels, active, 3)),
        (ops.relative_loss.default, (x, partners, margins)),
        (ops.relative_loss_backward.default, (grad, x0, partners, d, margins, triplets)),
        (ops.absolute_loss.default, (x, partners, 1.0)),
        (ops.absolute_loss_backward.default, (grad, x0, partners, d, 1.0, pairs)),
        (ops.distribution_loss.default, (x, partners, 10)),
        (ops.distribution_loss_backward.default, (grad, x0, partners, d, 10, hist, scale, pair_counts)),
    ]


def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


def test_op_argument_errors(device):
    ops = torch.ops.crl_ops
    features = torch.randn(6, 2, 3, device=device)
    partners = torch.zeros(6, 2, 4, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="partners must have shape"):
        ops.absolute_loss(features, torch.zeros(6, 3, 4, dtype=torch.long, device=device), 1.0)
    with pytest.raises(RuntimeError, match="partners must be int64"):
        ops.distribution_loss(features, partners.int(), 10)
    with pytest.raises(RuntimeError, match="bins must be >= 2"):
        ops.distribution_loss(features, partners, 1)
    with pytest.raises(RuntimeError, match="distances must be Double for Double features"):
        float_distances, pair_counts = torch.zeros(6, 2, 4, device=device), torch.zeros(2, dtype=torch.long, device=device)
        ops.absolute_loss_backward(torch.ones((), device=device), features.double(), partners, float_distances, 1.0,
                                   pair_counts)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        ops.profile(torch.zeros(6, dtype=torch.long, device=device), 2)
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        ops.mine_class(torch.rand(6, 2, 2, device=device), torch.zeros(6, 2, dtype=torch.long, device=device),
                       torch.zeros(2, 2, dtype=torch.bool, device=device), 0)
    with pytest.raises(RuntimeError, match="margins must have shape"):
        ops.relative_loss(features, partners, torch.zeros(3, device=device))


def test_cpu_kernel_rejects_out_of_range_indices():
    _native.require(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="labels\\[1, 0\\] = 5"):
        torch.ops.crl_ops.profile(torch.tensor([[0], [5]]), 2)
    with pytest.raises(RuntimeError, match="partner index 9"):
        torch.ops.crl_ops.absolute_loss(torch.randn(3, 1, 2), torch.tensor([[[9, -1]], [[-1, -1]], [[-1, -1]]]), 1.0)


def _top_level_ops(step) -> list:
    """Names of the ops a step dispatches from Python or the autograd engine (not from inside an op)."""
    def is_op(event):
        return event.name.startswith(("aten::", "crl_ops::"))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = []
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not is_op(parent):
            parent = parent.cpu_parent
        if is_op(event) and parent is None:
            names.append(event.name)
    return names


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_step_is_one_op_per_stage(device, mode, form):
    """A forward + backward dispatches profile, mining, the loss and its backward, and only a
    few cheap ops besides: no fills (on a GPU, each would be a launch) and no zero gradients
    for the loss ops' auxiliary outputs. Guards the host cost per step, which dominates on a GPU."""
    problem = make_problem(60, 40, (3, 3), 5, False, "list", skew=2.0)  # no padding of the logits
    features, logits, labels, _, _ = problem.inputs(torch.float32, device)
    crl = crl_ops.CRL(mode=mode, form=form, backend="native", validate=False)

    def step():
        torch.autograd.grad(crl(features, logits, labels), features)

    step()
    names = _top_level_ops(step)
    kernels = [n for n in names if n.startswith("crl_ops::")]
    assert kernels == ["crl_ops::profile", f"crl_ops::mine_{mode}", f"crl_ops::{form}_loss",
                       f"crl_ops::{form}_loss_backward"]
    fills = [n for n in names if n in ("aten::zeros", "aten::zeros_like", "aten::full", "aten::fill_", "aten::zero_")]
    assert not fills, names
    assert len(names) <= len(kernels) + 5, names  # stacking the logits, detach, argmax or softmax, the seed gradient


def test_native_without_kernels_for_the_device_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_native, "_has_kernel", lambda op, key: key == "CPU")
    monkeypatch.setattr(_native, "_BUILT_FOR", {})
    with pytest.raises(RuntimeError, match="no kernels for device type 'cuda'.*FORCE_CUDA=1"):
        _native.require(torch.device("cuda"))


# ---- memory ------------------------------------------------------------------------------------------------


def test_cpu_memory_far_below_a_distance_matrix():
    """B=8192, A=8, D=32: the native path's peak extra memory, measured in a fresh process."""
    _native.require(torch.device("cpu"))
    script = textwrap.dedent(
        """
        import resource, torch, crl_ops
        g = torch.Generator().manual_seed(0)
        B, A, D = 8192, 8, 32
        features = torch.randn(B, A, D, generator=g, requires_grad=True)
        logits = torch.randn(B, A, generator=g)
        labels = (torch.rand(B, A, generator=g) < 0.1).long()
        crl = crl_ops.CRL(mode="instance", form="relative", backend="native")
        crl(features[:64], logits[:64], labels[:64]).backward()  # load code paths first
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        crl(features, logits, labels).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    distance_matrix = 8 * 8192 * 8192 * 4  # one [A, B, B] float32 matrix: 2 GiB
    assert extra < distance_matrix / 8, f"peak extra memory {extra / 2**20:.0f} MiB"
