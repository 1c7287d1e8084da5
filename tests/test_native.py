"""The native kernels (CPU, and CUDA where a GPU is present) against the reference at larger sizes
and every dtype; gradcheck, determinism, op registration, the ops a step dispatches, and memory.
The comparison with the float64 oracle on random batches is in test_properties.py."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import crl_ops
from crl_ops import _native, reference

from .checks import gradcheck_crl
from .problems import FORMS, MODES, make_problem

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
LOW_PRECISION = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(params=DEVICES)
def device(request):
    _native.require(torch.device(request.param))  # a missing build fails here, it is not skipped
    return request.param


def _mined_keys(problem, mode, features, logits, labels, partners):
    """The ranking key of every mined partner (float64): its class probability or its distance."""
    f, lg, lab = features.detach().double().cpu(), logits, labels.cpu()
    if f.dim() == 2:
        f = f[:, None].expand(-1, partners.shape[1], -1)
    attribute = torch.arange(partners.shape[1])[None, :, None]
    index = partners.clamp_min(0)
    if mode == "instance":
        return (f[index, attribute] - f[:, :, None]).norm(dim=-1)
    batch = crl_ops._inputs.normalise(f, [x.detach().double().cpu() for x in lg] if isinstance(lg, list)
                                      else lg.detach().double().cpu(), lab)
    scores = reference.class_scores(batch.logits, batch.classes_tensor())  # [B, A, C]
    own = lab.clamp_min(0)[:, :, None].expand_as(partners)
    return scores[index, attribute, own]


def assert_same_selection(problem, mode, features, logits, labels, native, ref, tolerance):
    """Equal anchors; equal mined sets, up to candidates whose keys tie within `tolerance`."""
    assert torch.equal(native.anchors.cpu(), ref.anchors.cpu())
    k = ref.positives.shape[-1]
    got = torch.cat([native.positives, native.negatives], -1).cpu()
    want = torch.cat([ref.positives, ref.negatives], -1).cpu()
    differ = (got.view(-1, k).sort(-1).values != want.view(-1, k).sort(-1).values).any(-1).view(*got.shape[:2], 2)
    if tolerance == 0:
        assert not differ.any()
        return
    keys_got = _mined_keys(problem, mode, features, logits, labels, got)
    keys_want = _mined_keys(problem, mode, features, logits, labels, want)
    for i, j, side in differ.nonzero().tolist():
        half = slice(side * k, (side + 1) * k)
        a, b = got[i, j, half], want[i, j, half]
        assert (a >= 0).sum() == (b >= 0).sum()
        torch.testing.assert_close(keys_got[i, j, half][a >= 0].sort().values,
                                   keys_want[i, j, half][b >= 0].sort().values, rtol=tolerance, atol=tolerance)


def run_both(problem, mode, form, k, device, dtype, **options):
    """Loss, gradient, statistics and mined sets of each backend on one problem."""
    features, logits, labels, _, _ = problem.inputs(dtype, device)
    result = {}
    for backend in ("reference", "native"):
        crl = crl_ops.CRL(mode, form, k=k, backend=backend, **options)
        loss = crl(features, logits, labels)
        grad, = torch.autograd.grad(loss, features)
        mined = crl_ops.mine(features, logits, labels, mode, k, backend=backend,
                             **{o: v for o, v in options.items() if o in ("threshold", "normalize", "distance")})
        result[backend] = (loss.detach(), grad, crl.last_stats, mined)
    return (features, logits, labels), result


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
       k=st.sampled_from([1, 3, 5, 9, 20, 40, 64]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       reduction=st.sampled_from(["pooled", "attribute"]))
def test_native_matches_reference(device, problem, mode, form, k, dtype, reduction):
    inputs, result = run_both(problem, mode, form, k, device, dtype, reduction=reduction)
    (ref_loss, ref_grad, ref_stats, ref_mined), (loss, grad, stats, mined) = result["reference"], result["native"]
    for name in ("counts", "minority", "active"):
        assert torch.equal(getattr(stats, name).cpu(), getattr(ref_stats, name).cpu())
    tolerance = 0 if dtype == torch.float64 and mode == "instance" else 1e-5
    assert_same_selection(problem, mode, *inputs, mined, ref_mined, tolerance)
    same_pairs = all(torch.equal(a.sort(-1).values.cpu(), b.sort(-1).values.cpu())
                     for a, b in ((mined.positives, ref_mined.positives), (mined.negatives, ref_mined.negatives)))
    if same_pairs:  # where near-ties were broken differently the losses may differ: compared above
        assert torch.equal(stats.pair_counts.cpu(), ref_stats.pair_counts.cpu())
        tol = LOW_PRECISION[dtype]
        torch.testing.assert_close(loss.cpu(), ref_loss.cpu(), rtol=tol, atol=tol)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double().cpu(), ref_grad.double().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [33, 64, 65, 200])
@pytest.mark.parametrize("mode", MODES)
def test_k_beyond_the_paper(device, mode, k):
    problem = make_problem(7, 300, (2, 5), 6, False, "list", skew=1.5)
    inputs, result = run_both(problem, mode, "relative", k, device, torch.float64)
    assert_same_selection(problem, mode, *inputs, result["native"][3], result["reference"][3],
                          0 if mode == "instance" else 1e-12)
    torch.testing.assert_close(result["native"][0], result["reference"][0])


def test_strided_inputs_are_read_in_place(device):
    def agree(f, lg, lb):
        for mode in MODES:
            ref = crl_ops.CRL(mode, backend="reference")(f, lg, lb)
            nat = crl_ops.CRL(mode, backend="native")(f, lg, lb)
            torch.testing.assert_close(nat, ref, rtol=1e-10, atol=1e-12)

    problem = make_problem(12, 200, (4, 4, 4), 16, False, "tensor3d", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    x, z = features.detach(), logits.detach()
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # [B, A, D] with A outermost
    for f in (strided, x[:, 0], x[:, :, ::2]):  # a [B, D] input is expanded with stride 0
        agree(f, z, labels)
    agree(x, z.transpose(0, 2).contiguous().transpose(0, 2), labels)  # [B, A, C] logits, C outermost
    agree(x, list(z.unbind(1)), labels)
    binary = torch.randn(200, 6, 3, dtype=torch.float64, device=device)[:, ::2, 1]  # [B, A] logits, strided
    agree(x, binary, (torch.rand(200, 3, device=device) < 0.2).long())


# ---- gradients, determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["pooled", "attribute"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(device, mode, form, reduction):
    problem = make_problem(21, 14, (2, 3), 3, False, "list", skew=1.5)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    crl = crl_ops.CRL(mode, form, k=3, bins=7, reduction=reduction, backend="native")
    # gradcheck also asserts that backward is reentrant (bitwise equal twice): on CUDA that
    # needs the deterministic (atomic-free) backward.
    torch.use_deterministic_algorithms(device == "cuda")
    try:
        assert gradcheck_crl(crl, features, logits, labels)
    finally:
        torch.use_deterministic_algorithms(False)


def test_gradcheck_margins(device):
    problem = make_problem(22, 20, (2, 3), 3, False, "list", skew=1.5)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    margins = torch.tensor([0.4, 1.3], dtype=torch.float64, device=device, requires_grad=True)
    torch.use_deterministic_algorithms(device == "cuda")
    try:
        assert torch.autograd.gradcheck(
            lambda m: crl_ops.class_rectification_loss(features.detach(), logits, labels, margin=m,
                                                       backend="native"), (margins,))
    finally:
        torch.use_deterministic_algorithms(False)


def _feature_gradient(problem, mode, form, device, dtype=torch.float32):
    features, logits, labels, _, _ = problem.inputs(dtype, device)
    loss = crl_ops.CRL(mode, form, backend="native")(features, logits, labels)
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


# ---- op registration ---------------------------------------------------------------------------------------


def _op_samples(device):
    problem = make_problem(50, 40, (2, 3), 5, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    batch = crl_ops._inputs.normalise(features, logits, labels)
    classes = batch.classes_tensor()
    x = features.detach().requires_grad_()
    ops = torch.ops.crl_ops
    _, _, active = ops.profile(batch.labels, classes, 3, 0.5, True)
    margins = torch.full((2,), 0.7, dtype=torch.float64, device=device, requires_grad=True)
    samples = [
        (ops.profile.default, (batch.labels, classes, 3, 0.5, True)),
        (ops.mine_class.default, (batch.logits, batch.labels, classes, active, 3, 0, 40, True)),
        (ops.mine_instance.default, (x.detach(), batch.logits, batch.labels, classes, active, 3, 10, 25, True)),
    ]
    for form in FORMS:
        args = (x, batch.logits, batch.labels, classes, margins, "instance", form, 3, 1.0, 10, 0.5, "pooled", True)
        samples.append((ops.crl_loss.default, args))
        loss, _, _, _, _, partners, counts, d, sums, hist = ops.crl_loss(*args)
        grad = torch.ones((), dtype=torch.float64, device=device)
        samples.append((ops.crl_loss_backward.default, (grad, loss.detach(), x.detach(), partners, d, margins.detach(),
                                                         counts, sums, hist, form, 1.0, 10, "pooled", True)))
    samples += [(ops.class_lists.default, (batch.logits.detach(), batch.labels, classes, None, 3, True)),
                (ops.class_lists.default, (batch.logits.detach(), batch.labels, classes, active, 3, True))]
    vectors = torch.randn(40, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    partners = ops.mine_instance(vectors.detach(), batch.logits, batch.labels, classes, active, 3, 10, 25, True)[1]
    d, _ = ops.pair_distances(vectors, partners, 10)
    samples += [(ops.pair_distances.default, (vectors, partners, 10)),
                (ops.pair_distances.default, (vectors[:, :1], partners, 10)),
                (ops.pair_distances_backward.default, (torch.randn_like(d), vectors.detach(), partners, d.detach(), 10))]
    longest = reference.longest_distance(d, partners)
    for form in FORMS:
        args = (d.detach().requires_grad_(), partners, margins, longest if form == "distribution" else None, form,
                1.0, 10)
        samples.append((ops.pair_sums.default, args))
        grad = torch.randn_like(ops.pair_sums(*args))
        samples.append((ops.pair_sums_backward.default, (grad, *[a.detach() if isinstance(a, torch.Tensor) else a
                                                                for a in args], True)))
    # crl_ops.distributed's steps
    own = vectors[10:35]
    samples += [(ops.shard_mine.default, (vectors.detach(), batch.logits, batch.labels, classes, "instance", 3, 0.5, 10,
                                          25, False, True)),
                (ops.shard_mine.default, (own.detach(), batch.logits, batch.labels, classes, "class", 3, 0.5, 10, 25,
                                          True, True))]
    anchors, partners, checks, lists = ops.shard_mine(own.detach(), batch.logits, batch.labels, classes, "class", 3,
                                                      0.5, 10, 25, True, True)[3:]
    table = ops.shard_table(own.detach(), lists, 10)
    d, overflow, longest = ops.table_distances(own.detach(), table, partners)
    scale = torch.tensor(2.0, dtype=torch.float64, device=device)
    samples += [(ops.shard_table.default, (own.detach(), lists, 10)),
                (ops.shard_table_backward.default, (torch.randn_like(table), torch.randn_like(own), lists, 10, scale)),
                (ops.table_distances.default, (own.detach(), table, partners)),
                (ops.table_distances_backward.default, (torch.randn_like(d), own.detach(), table, partners, d))]
    for form in FORMS:
        args = (d.detach().requires_grad_(), partners, anchors, margins, longest if form == "distribution" else None, overflow,
                checks, form, 1.0, 10)
        samples.append((ops.shard_sums.default, args))
        partial = ops.shard_sums(*args)
        samples.append((ops.shard_sums_backward.default, (torch.randn_like(partial), d.detach(), partners,
                                                          margins.detach(), args[4], form, 1.0, 10, True)))
        total = partial.detach().requires_grad_()
        samples += [(ops.shard_loss.default, (total, 2, form, 10, "pooled", torch.float64, 2, True)),
                    (ops.shard_loss_backward.default, (torch.ones((), dtype=torch.float64, device=device),
                                                       total.detach(), 2, form, 10, "attribute", torch.float64))]
    return samples


def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


def test_op_argument_errors(device):
    ops = torch.ops.crl_ops
    labels = torch.zeros(6, 2, dtype=torch.long, device=device)
    classes = torch.full((2,), 2, dtype=torch.long, device=device)
    features = torch.randn(6, 2, 3, device=device)
    logits = torch.randn(6, 2, device=device)
    margins = torch.ones(2, device=device)
    active = torch.zeros(2, 2, dtype=torch.bool, device=device)

    def loss(**change):
        args = dict(features=features, logits=logits, labels=labels, num_classes=classes, margins=margins,
                    mode="instance", form="relative", k=3, apc_margin=1.0, bins=10, threshold=0.5,
                    reduction="pooled", validate=True)
        args.update(change)
        return ops.crl_loss(*args.values())

    with pytest.raises(ValueError, match="labels must have shape"):
        ops.profile(labels[:, 0], classes, 2, 0.5, True)
    with pytest.raises(TypeError, match="labels must be int64"):
        ops.profile(labels.int(), classes, 2, 0.5, True)
    with pytest.raises(ValueError, match="num_classes must have shape"):
        ops.profile(labels, classes[:1], 2, 0.5, True)
    with pytest.raises(ValueError, match="threshold must be in"):
        ops.profile(labels, classes, 2, 1.5, True)
    with pytest.raises(ValueError, match="k must be between 1 and 1024"):
        ops.mine_class(logits, labels, classes, active, 0, 0, 6, True)
    with pytest.raises(ValueError, match="anchor rows"):
        ops.mine_instance(features, logits, labels, classes, active, 3, 4, 3, True)
    with pytest.raises(ValueError, match="active must be"):
        ops.mine_class(logits, labels, classes, active[:, :1], 3, 0, 6, True)
    with pytest.raises(ValueError, match="features must have shape"):
        loss(features=features[:, :, :0])
    with pytest.raises(TypeError, match="features must be float16"):
        loss(features=features.long())
    with pytest.raises(ValueError, match="logits must have shape"):
        loss(logits=logits[:, :1])
    with pytest.raises(ValueError, match="margins must have shape"):
        loss(margins=margins[:1])
    with pytest.raises(ValueError, match="mode must be"):
        loss(mode="both")
    with pytest.raises(ValueError, match="form must be"):
        loss(form="hinge")
    with pytest.raises(ValueError, match="reduction must be"):
        loss(reduction="sum")
    with pytest.raises(ValueError, match="bins must be between"):
        loss(bins=1)
    with pytest.raises(ValueError, match="apc_margin must be"):
        loss(apc_margin=-1.0)
    out = loss()
    with pytest.raises(ValueError, match="partners must have shape"):
        ops.crl_loss_backward(torch.ones((), device=device), out[0], features, out[5][:, :1], out[7], margins,
                              out[6], out[8], out[9], "relative", 1.0, 10, "pooled", False)
    with pytest.raises(ValueError, match="histograms must be"):
        ops.crl_loss_backward(torch.ones((), device=device), out[0], features, out[5], out[7], margins, out[6],
                              out[8], out[9], "distribution", 1.0, 10, "pooled", False)


def test_cpu_op_rejects_bad_indices_and_class_counts():
    _native.require(torch.device("cpu"))
    ops = torch.ops.crl_ops
    features = torch.randn(3, 1, 2)
    out = ops.crl_loss(features, torch.randn(3, 1), torch.tensor([[0], [0], [1]]), torch.tensor([2]), torch.ones(1),
                       "instance", "relative", 1, 1.0, 10, 0.5, "pooled", True)
    partners = torch.tensor([[[9, -1]], [[-1, -1]], [[-1, -1]]])
    with pytest.raises(ValueError, match="partner index 9"):
        ops.crl_loss_backward(torch.ones(()), out[0], features, partners, out[7], torch.ones(1), out[6], out[8],
                              out[9], "relative", 1.0, 10, "pooled", False)
    with pytest.raises(ValueError, match=r"num_classes\[0\] = 3 must be between 2 and the 2 classes"):
        ops.profile(torch.tensor([[0], [1]]), torch.tensor([3]), 2, 0.5, True)


# ---- class lists and the steps of distributed=True ---------------------------------------------------------


def _class_problem(device, logit_format="list"):
    num_classes = (2, 2, 2) if logit_format == "binary" else (2, 3, 4)
    problem = make_problem(11, 60, num_classes, 4, False, logit_format, skew=2.0, duplicates=4, tied_logits=3)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    batch = crl_ops._inputs.normalise(features, logits, labels)
    return batch, batch.classes_tensor()


@pytest.mark.parametrize("logit_format", ["list", "binary"])
@pytest.mark.parametrize("backend", [_native, reference], ids=["native", "reference"])
def test_class_lists_give_the_rows_of_mine_class(device, backend, logit_format):
    batch, classes = _class_problem(device, logit_format)
    counts, _, active = backend.profile(batch.labels, classes, batch.max_classes, 0.5, True)
    keys, lists = backend.class_lists(batch.logits, batch.labels, classes, None, 4, True)
    assert keys.shape == lists.shape == (3, batch.logits.shape[2] if batch.logits.dim() == 3 else 2, 8)
    assert keys.dtype == torch.float64
    assert (lists >= 0).sum() > 40 and active.any()
    k = 4
    assert torch.all(torch.where(lists[..., :k] < 0, keys[..., :k] == math.inf, keys[..., :k] <= 1))
    assert torch.all(torch.where(lists[..., k:] < 0, keys[..., k:] == -math.inf, keys[..., k:] >= 0))
    active_lists = backend.class_lists(batch.logits, batch.labels, classes, active, 4, True)[1]
    assert torch.equal(active_lists, torch.where(active[..., None], lists, -1))  # only the active classes' lists
    for first, rows in ((0, 60), (17, 25)):
        want = backend.mine_class(batch.logits, batch.labels, classes, active, k, first, rows, True)
        for class_level in (lists, active_lists):
            got = reference.class_rows(class_level, batch.labels[first:first + rows], active, first)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _shard_outputs(backend, batch, classes, vectors, mode, partner_rows, first, rows, form):
    """A rank's steps (crl_ops.distributed) on the batch: the mined pairs, the distances and the
    partial sums vector, and the gradients of its rows for a gradient of the sums."""
    own = vectors[first:first + rows].detach().requires_grad_()
    mined = backend.shard_mine(own if mode == "class" else vectors, batch.logits, batch.labels, classes, mode, 3, 0.5,
                               first, rows, partner_rows, True)
    counts, minority, active, anchors, partners, checks, lists = mined
    margins = torch.full((3,), 0.7, dtype=torch.float64, device=vectors.device)
    if partner_rows:
        table = backend.shard_table(own.detach(), lists, first)  # one rank holds every listed row here
        d, overflow, longest = backend.table_distances(own.detach(), table, partners)
    else:
        d, overflow = reference.pair_distances(vectors, partners, first)
        longest = reference.longest_distance(d, partners)
    d = d.detach().requires_grad_()
    partial = backend.shard_sums(d, partners, anchors, margins, longest, overflow, checks, form, 1.0, 7)
    (grad_d,) = torch.autograd.grad(partial, d, torch.linspace(0.5, 1.5, partial.shape[0], dtype=torch.float64,
                                                               device=d.device))
    out = {"mined": mined, "d": d.detach(), "longest": longest, "partial": partial.detach(), "grad_d": grad_d}
    if partner_rows:
        grad_rows, grad_table = backend.table_distances_backward(grad_d, own.detach(), table, partners, d.detach())
        scale = torch.tensor(2.0, dtype=torch.float64, device=d.device)
        out["grad_own"] = backend.shard_table_backward(grad_table, grad_rows, lists, first, scale)
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode, partner_rows", [("instance", False), ("class", False), ("class", True)])
def test_the_distributed_steps_match_the_reference(device, mode, partner_rows, form):
    """shard_mine, shard_table, table_distances, shard_sums and their backward against the
    reference, bitwise where no float sum's order differs; class mode's partner rows give the
    partners, distances and row gradients of mining the whole batch."""
    batch, classes = _class_problem(device)
    vectors = batch.features.detach()
    first, rows = (0, 60) if partner_rows else (17, 25)  # the partner table of the whole batch
    native = _shard_outputs(_native, batch, classes, vectors, mode, partner_rows, first, rows, form)
    expected = _shard_outputs(reference, batch, classes, vectors, mode, partner_rows, first, rows, form)
    for got, want in zip(native["mined"], expected["mined"], strict=True):
        assert torch.equal(got, want)
    for name in ("d", "longest", "partial", "grad_d") + (("grad_own",) if partner_rows else ()):
        torch.testing.assert_close(native[name], expected[name], rtol=1e-12, atol=1e-12)
    if partner_rows:  # the same pairs and distances as mining the rows against the batch
        whole = _shard_outputs(reference, batch, classes, vectors, mode, False, first, rows, form)
        assert torch.equal(native["mined"][3], whole["mined"][3])
        torch.testing.assert_close(native["d"], whole["d"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(native["partial"], whole["partial"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["pooled", "attribute"])
@pytest.mark.parametrize("form", FORMS)
def test_shard_loss_is_the_loss_of_the_sums_and_its_gradient(device, form, reduction):
    batch, classes = _class_problem(device)
    vectors = batch.features.detach()
    partial = _shard_outputs(_native, batch, classes, vectors, "instance", False, 0, 60, form)["partial"]
    got = {}
    for backend in (_native, reference):
        total = partial.clone().requires_grad_()
        loss, pair_counts, grad_scale = backend.shard_loss(total, 3, form, 7, reduction, torch.float64, 3, True)
        (grad,) = torch.autograd.grad(loss, total)
        got[backend] = loss, pair_counts, grad_scale, grad
    for native, expected in zip(got[_native], got[reference], strict=True):
        torch.testing.assert_close(native, expected, rtol=1e-12, atol=1e-14)
    loss = crl_ops.CRL(mode="instance", form=form, k=3, margin=0.7, bins=7, reduction=reduction, backend="reference")(
        batch.features, batch.logits, batch.labels)
    torch.testing.assert_close(got[_native][0], loss, rtol=1e-12, atol=1e-12)  # the single process's loss
    assert got[_native][2].item() == 3.0
    for flag, message in ((1, "logits contain NaN"), (2, "features contain NaN"), (0, "squared distance")):
        flagged = partial.clone()
        flagged[-3 + flag] = 1.0
        for backend in (_native, reference):
            with pytest.raises(ValueError, match=message):
                backend.shard_loss(flagged, 3, form, 7, reduction, torch.float64, 3, True)
            loss, _, grad_scale = backend.shard_loss(flagged.requires_grad_(), 3, form, 7, reduction, torch.float64,
                                                     3, False)
            (grad,) = torch.autograd.grad(loss, flagged)
            assert torch.isnan(loss) and torch.isnan(grad_scale) and torch.isnan(grad).all()
            flagged = flagged.detach()


# ---- the pair ops (a rank's own anchors under distributed=True) ---------------------------------------------


def _pair_problem(device, dtype, shared, first=9, rows=24):
    """Gathered-like vectors [N, A or 1, D], the partners of anchor rows first..first + rows mined
    against all N, and margins that require grad."""
    problem = make_problem(7, 48, (2, 3, 2), 6, shared, "list", skew=2.0, duplicates=2)
    features, logits, labels, _, _ = problem.inputs(torch.float64, device)
    batch = crl_ops._inputs.normalise(features, logits, labels)
    classes = batch.classes_tensor()
    _, _, active = torch.ops.crl_ops.profile(batch.labels, classes, 3, 0.5, True)
    vectors = batch.features[:, :1] if shared else batch.features
    partners = torch.ops.crl_ops.mine_instance(batch.features.detach(), batch.logits, batch.labels, classes, active,
                                               3, first, rows, True)[1]
    assert (partners >= 0).sum() > 20  # enough pairs to test something
    margins = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device, requires_grad=True)
    return vectors.detach().to(dtype).requires_grad_(), partners, margins


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_pair_ops_match_the_reference(device, dtype, shared, form):
    vectors, partners, margins = _pair_problem(device, dtype, shared)
    first = 9
    results = []
    for backend in (_native, reference):
        d, overflow = backend.pair_distances(vectors, partners, first)
        longest = reference.longest_distance(d, partners) if form == "distribution" else None
        sums = backend.pair_sums(d, partners, margins, longest, form, 1.5, 12)
        weights = torch.linspace(-1.0, 2.0, sums.numel(), dtype=sums.dtype, device=device).view(sums.shape)
        grads = torch.autograd.grad((sums * weights).sum(), (vectors, margins), allow_unused=True)
        results.append((d, overflow, sums, grads))
    (d, overflow, sums, grads), (d_ref, overflow_ref, sums_ref, grads_ref) = results
    tolerance = LOW_PRECISION[torch.float32 if dtype != torch.float64 else dtype]
    assert d.dtype == d_ref.dtype and not overflow and not overflow_ref
    torch.testing.assert_close(d, d_ref, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(sums, sums_ref, rtol=tolerance, atol=tolerance)
    assert grads[0].shape == vectors.shape and grads[0].dtype == vectors.dtype
    torch.testing.assert_close(grads[0].double(), grads_ref[0].double(), rtol=LOW_PRECISION[dtype] * 10,
                               atol=LOW_PRECISION[dtype] * 10)
    if form == "relative":
        torch.testing.assert_close(grads[1], grads_ref[1], rtol=tolerance, atol=tolerance)
    else:
        assert grads_ref[1] is None and not grads[1].any()  # unused: zeros, as the fused op's


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_pair_ops_gradcheck(device, shared, form):
    vectors, partners, margins = _pair_problem(device, torch.float64, shared)
    d = torch.ops.crl_ops.pair_distances(vectors, partners, 9)[0]
    longest = reference.longest_distance(d, partners) if form == "distribution" else None
    assert torch.autograd.gradcheck(lambda v: torch.ops.crl_ops.pair_distances(v, partners, 9)[0], (vectors,))
    inputs = (d.detach().requires_grad_(), margins)
    assert torch.autograd.gradcheck(
        lambda dist, m: torch.ops.crl_ops.pair_sums(dist, partners, m, longest, form, 1.5, 12), inputs)


def test_pair_op_argument_errors(device):
    ops = torch.ops.crl_ops
    vectors = torch.randn(6, 2, 3, device=device)
    partners = torch.full((2, 2, 4), -1, dtype=torch.long, device=device)
    margins = torch.ones(2, device=device)
    with pytest.raises(ValueError, match=r"vectors must have shape \[N < 2\^31, A, D >= 1\] or \[N, 1, D\]"):
        ops.pair_distances(torch.randn(6, 3, 3, device=device), partners, 0)
    with pytest.raises(TypeError, match="vectors must be float16"):
        ops.pair_distances(vectors.long(), partners, 0)
    with pytest.raises(ValueError, match="partners must have shape"):
        ops.pair_distances(vectors, partners[..., :3], 0)
    with pytest.raises(ValueError, match="anchor rows"):
        ops.pair_distances(vectors, partners, 5)
    d, _ = ops.pair_distances(vectors, partners, 4)
    with pytest.raises(ValueError, match="grad must be float32"):
        ops.pair_distances_backward(d.double(), vectors, partners, d, 4)
    with pytest.raises(ValueError, match="the distribution form needs longest"):
        ops.pair_sums(d, partners, margins, None, "distribution", 1.0, 10)
    with pytest.raises(ValueError, match="margins must have shape"):
        ops.pair_sums(d, partners, margins[:1], None, "relative", 1.0, 10)
    with pytest.raises(ValueError, match="distances must be float32"):
        ops.pair_sums(d[:1], partners, margins, None, "relative", 1.0, 10)
    with pytest.raises(ValueError, match="form must be"):
        ops.pair_sums(d, partners, margins, None, "hinge", 1.0, 10)
    with pytest.raises(ValueError, match=r"grad must be a floating tensor \[2, 2, 10\]"):
        ops.pair_sums_backward(torch.ones(2, 2, device=device), d, partners, margins, torch.ones(2, device=device),
                               "distribution", 1.0, 10, False)


def test_cpu_pair_op_rejects_partners_outside_the_vectors():
    _native.require(torch.device("cpu"))
    partners = torch.tensor([[[6, -1]]])
    with pytest.raises(ValueError, match="partner index 6 is outside -1..5"):
        torch.ops.crl_ops.pair_distances(torch.randn(6, 1, 2), partners, 0)


# ---- the ops of one step --------------------------------------------------------------------------------

_NOT_COMPUTE = {"aten.detach.default", "aten.view.default", "aten.expand.default", "aten.alias.default",
                "aten._unsafe_view.default", "aten.t.default", "aten.select.int", "aten.slice.Tensor",
                "aten.unsqueeze.default"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
def test_default_step_is_four_ops_or_fewer(device, mode):
    """A forward + backward of the default CRL() on binary [B, A] logits dispatches the fused loss
    op and its backward: no zeros, stack, cat, argmax, fill or host synchronisation around them
    (views and the autograd seed do not count)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 3, 5, generator=g).to(device).requires_grad_()
    logits = torch.randn(40, 3, generator=g).to(device)
    labels = (torch.rand(40, 3, generator=g) < 0.2).long().to(device)
    crl = crl_ops.CRL(mode)

    def step():
        torch.autograd.grad(crl(features, logits, labels), features, grad_outputs=torch.ones((), device=device))

    step()  # constants cached, kernels built
    grad_seed = torch.ones((), device=device)
    with OpLog() as log:
        torch.autograd.grad(crl(features, logits, labels), features, grad_outputs=grad_seed)
    compute = [op for op in log.ops if op not in _NOT_COMPUTE]
    assert compute == ["crl_ops.crl_loss.default", "crl_ops.crl_loss_backward.default"], log.ops


def test_native_without_kernels_for_the_device_says_why(monkeypatch):
    monkeypatch.setitem(_native._UNAVAILABLE, "cuda", "nvcc was not found (set CUDA_HOME)")
    with pytest.raises(RuntimeError, match="native kernels are not available: nvcc was not found"):
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


# ---- a tensor margin is the module's state; double backward ------------------------------------------------

BACKENDS = ["reference", "native"]


def _margin_problem(backend):
    if backend == "native":
        _native.require(torch.device("cpu"))
    problem = make_problem(40, 24, (2, 3), 4, False, "list", skew=1.5)
    return problem.inputs(torch.float64)[:3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_margin_moves_converts_and_is_saved_with_the_module(backend):
    """A plain tensor margin is a buffer: `.double()`/`.to()` convert and move it (the loss then
    runs on it) and state_dict saves it; load_state_dict, deepcopy and pickle keep it."""
    import copy
    import pickle

    features, logits, labels = _margin_problem(backend)
    margin = torch.tensor([0.4, 1.3])
    crl = crl_ops.CRL("instance", margin=margin, backend=backend)
    assert [name for name, _ in crl.named_buffers()] == ["margin"] and crl.margin is margin
    assert not list(crl.parameters())
    want = crl_ops.class_rectification_loss(features, logits, labels, mode="instance", margin=[0.4, 1.3],
                                            backend=backend)
    assert crl.double() is crl and crl.margin.dtype == torch.float64
    torch.testing.assert_close(crl(features, logits, labels), want, rtol=1e-6, atol=1e-9)

    state = crl.state_dict()
    assert list(state) == ["margin"] and torch.equal(state["margin"], margin.double())
    other = crl_ops.CRL("instance", margin=torch.zeros(2, dtype=torch.float64), backend=backend)
    other.load_state_dict(state)
    assert torch.equal(other.margin, margin.double())
    torch.testing.assert_close(other(features, logits, labels), want, rtol=1e-6, atol=1e-9)
    for copied in (copy.deepcopy(crl), pickle.loads(pickle.dumps(crl))):
        assert torch.equal(copied.margin, crl.margin) and copied.margin.data_ptr() != crl.margin.data_ptr()
        torch.testing.assert_close(copied(features, logits, labels), want, rtol=1e-6, atol=1e-9)
    assert list(crl_ops.BalancedLoss(margin=margin, backend=backend).state_dict()) == ["crl.margin"]

    devices = ["meta"] + (["cuda"] if torch.cuda.is_available() and backend == "reference" else [])
    for device in devices:  # the margin must be on the features' device: it moves with the module
        moved = copy.deepcopy(crl).to(device)
        assert moved.margin.device.type == device
        loss = moved(features.detach().to(device), [x.detach().to(device) for x in logits], labels.to(device))
        if device != "meta":
            torch.testing.assert_close(loss.cpu(), want, rtol=1e-6, atol=1e-9)


def test_parameter_and_float_margins_stay_what_they_are():
    parameter = torch.nn.Parameter(torch.tensor([0.4, 1.3]))
    crl = crl_ops.CRL(margin=parameter)
    assert [name for name, _ in crl.named_parameters()] == ["margin"] and crl.margin is parameter
    assert not list(crl.buffers())
    for margin in (None, 0.5, (0.4, 1.3)):
        crl = crl_ops.CRL(margin=margin)
        assert crl.margin == margin and not crl.state_dict()


def test_checkpoint_saved_before_margins_were_loads():
    """A state_dict of the version before tensor margins were saved has no "margin": loading it
    keeps the constructor's margin; a current one without it is missing a key."""
    crl = crl_ops.CRL(margin=torch.tensor([0.4, 1.3]))
    old = crl.state_dict()
    del old["margin"]
    old._metadata[""]["version"] = 1
    crl.load_state_dict(old)
    assert torch.equal(crl.margin, torch.tensor([0.4, 1.3]))
    current = crl.state_dict()
    del current["margin"]
    with pytest.raises(RuntimeError, match='Missing key.*"margin"'):
        crl.load_state_dict(current)


def test_native_gives_first_derivatives_only_and_the_reference_hessian_vector_products():
    """backend="native" has no double backward (docs/kernels.md); backend="reference" is plain
    PyTorch: its Hessian-vector product equals central differences of its gradient. Class mode
    mines on the logits, so the mined pairs do not change with the features."""
    _native.require(torch.device("cpu"))
    problem = make_problem(50, 8, (2, 3), 3, False, "list", skew=1.0, unannotated=0.0)
    features, logits, labels, _, _ = problem.inputs(torch.float64)
    logits = [x.detach() for x in logits]
    direction = torch.randn(features.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    native = crl_ops.CRL("class", margin=4.0, backend="native")
    grad, = torch.autograd.grad(native(features, logits, labels), features, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad((grad * direction).sum(), features)

    reference = crl_ops.CRL("class", margin=4.0, backend="reference")

    def gradient(x):
        return torch.autograd.grad(reference(x, logits, labels), x, create_graph=True)[0]

    assert reference(features, logits, labels) > 0 and reference.last_stats.pair_counts[:, 3].sum() > 0
    hvp, = torch.autograd.grad((gradient(features) * direction).sum(), features)
    step = 1e-6
    plus = gradient((features.detach() + step * direction).requires_grad_())
    minus = gradient((features.detach() - step * direction).requires_grad_())
    assert hvp.abs().max() > 1e-3
    torch.testing.assert_close(hvp, (plus - minus).detach() / (2 * step), rtol=1e-6, atol=1e-8)
