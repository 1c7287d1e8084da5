"""The pure-PyTorch reference against the loop-by-loop float64 oracle (tests/oracle.py)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crl_ops
from crl_ops import Mined

from . import oracle
from .problems import FORMS, MODES, make_problem, mined_sets, problems



def _margins(num_classes, margin):
    if margin is None:
        return [2 * math.pi / c for c in num_classes]
    if isinstance(margin, float):
        return [margin] * len(num_classes)
    return list(margin)


def check_against_oracle(problem, mode, form, k, margin=None, apc_margin=1.0, bins=100, backend="reference",
                         dtype=torch.float64, device="cpu", rtol=1e-9, atol=1e-12, exact_mining=True):
    features, logits, labels, canonical, leaves = problem.inputs(dtype, device)
    loss_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=k, margin=margin, apc_margin=apc_margin, bins=bins,
                                   backend=backend)
    total = loss_fn(features, logits, labels)
    grads = torch.autograd.grad(total, leaves)
    mined = crl_ops.mine(features, logits, labels, mode=mode, k=k, backend=backend)

    f64, lg64, lab = canonical()
    expected_mined = oracle.mine(f64.detach(), [x.detach() for x in lg64], lab, mode, k)
    if exact_mining:
        assert mined_sets(mined, k) == expected_mined
    _check_empty_rows(mined)

    crl_expected = oracle.crl_loss(f64, expected_mined, form, _margins(problem.num_classes, margin), apc_margin, bins)
    ce_expected = oracle.cross_entropy(lg64, lab)
    total_expected = ce_expected + crl_expected
    expected_grads = torch.autograd.grad(total_expected, leaves, allow_unused=True)

    torch.testing.assert_close(loss_fn.last_crl.double().cpu(), crl_expected.detach().cpu(), rtol=rtol, atol=atol)
    torch.testing.assert_close(loss_fn.last_ce.double().cpu(), ce_expected.detach().cpu(), rtol=rtol, atol=atol)
    for got, want in zip(grads, expected_grads):
        want = torch.zeros_like(got) if want is None else want
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol)
    return loss_fn


def _check_empty_rows(mined: Mined):
    not_anchor = ~mined.anchors
    assert (mined.positives[not_anchor] == -1).all()
    assert (mined.negatives[not_anchor] == -1).all()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), mode=st.sampled_from(MODES), form=st.sampled_from(FORMS), k=st.integers(1, 6),
       bins=st.sampled_from([2, 3, 7, 100]))
def test_reference_matches_oracle(problem, mode, form, k, bins):
    check_against_oracle(problem, mode, form, k, bins=bins)


@pytest.mark.parametrize("margin", [0.5, (0.3, 1.0, 2.0)])
def test_margin_forms(margin):
    problem = make_problem(3, 20, (2, 3, 4), 3, False, "list", skew=2.0)
    check_against_oracle(problem, "instance", "relative", 3, margin=margin)


def test_absolute_margin():
    problem = make_problem(4, 20, (2, 5), 3, False, "list", skew=2.0)
    check_against_oracle(problem, "class", "absolute", 4, apc_margin=2.5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_k_larger_than_candidates(mode, form):
    problem = make_problem(2, 9, (2, 3), 2, False, "list", skew=1.0)  # anchors in both attributes
    loss_fn = check_against_oracle(problem, mode, form, k=50)
    assert (loss_fn.last_stats.num_anchors > 0).all()


@pytest.mark.parametrize("form", FORMS)
def test_no_minority_class_gives_connected_zero(form):
    # Balanced labels: no class is below half of the batch, so nothing is mined.
    features = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(8, 2, dtype=torch.float64)
    labels = torch.tensor([[0, 1], [1, 0]] * 4)
    crl = crl_ops.CRL(form=form, backend="reference")
    loss = crl(features, logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and (features.grad == 0).all()
    assert crl.last_stats.num_anchors.sum() == 0


@pytest.mark.parametrize("mode", MODES)
def test_single_sample_class_is_not_an_anchor(mode):
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])  # class 1 has one sample, class 2 two
    features = torch.randn(8, 4, dtype=torch.float64)
    logits = torch.randn(8, 3, dtype=torch.float64)
    counts, active = crl_ops.profile_minority(labels, 3, backend="reference")
    assert counts.tolist() == [[5, 1, 2]]
    assert active.tolist() == [[False, False, True]]
    mined = crl_ops.mine(features, logits, labels, mode=mode, backend="reference")
    assert mined.anchors[:, 0].nonzero().flatten().tolist() == [6, 7]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_zero_distance_has_zero_gradient(mode, form):
    problem = make_problem(11, 16, (2, 2), 3, False, "list", skew=2.0, duplicates=6)
    check_against_oracle(problem, mode, form, k=4)
    features = torch.zeros(6, 1, 2, dtype=torch.float64, requires_grad=True)  # every distance is zero
    labels = torch.tensor([[0], [0], [0], [0], [1], [1]])
    logits = torch.zeros(6, 1, dtype=torch.float64)
    loss = crl_ops.CRL(mode=mode, form=form, backend="reference")(features, logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and (features.grad == 0).all()


def test_profile_strict_half_rule():
    # n = 6: classes with 3 samples sum to exactly half, so neither is a minority.
    labels = torch.tensor([[0], [0], [0], [1], [1], [1]])
    _, active = crl_ops.profile_minority(labels, 2, backend="reference")
    assert not active.any()
    # Ties in count go to the lower class index first: 2 + 2 < 7/2 is false, so only class 0.
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    _, active = crl_ops.profile_minority(labels, 3, backend="reference")
    assert active.tolist() == [[True, False, False]]
    labels = torch.tensor([-1, -1, 0, 1, 1, 1, 1])  # unannotated samples do not count in n
    counts, active = crl_ops.profile_minority(labels, 2, backend="reference")
    assert counts.tolist() == [[1, 4]] and not active.any()


def test_binary_logit_zero_predicts_class_zero():
    # Sample 3 (class 1) has z = 0: predicted class 0, so it is a misclassified positive.
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0], [5.0], [9.0], [10.0], [11.0]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    z = torch.tensor([[5.0], [0.0], [-1.0], [0.0], [0.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    mined = crl_ops.mine(features, z, labels[:, None], k=5, backend="reference")
    # anchor 0 (class 1): misclassified class-1 samples are 1 (z = 0) and 2 (z < 0)
    assert set(mined.positives[0, 0].tolist()) - {-1} == {1, 2}


def gradcheck_crl(crl, features, logits, labels):
    """gradcheck of crl w.r.t. features. The distribution form takes no gradient through its range R
    (semantics section 3), so the two feature vectors that span R in each attribute stay fixed."""
    free = torch.ones_like(features, dtype=torch.bool)
    if crl.options.form == "distribution":
        partners = torch.cat(crl_ops.mine(features, logits, labels, mode=crl.options.mode, k=crl.options.k)[1:], -1)
        d, _ = crl_ops.reference.pair_distances(features.detach(), partners)
        for j in range(features.shape[1]):
            flat = d[:, j].argmax()
            i, m = divmod(int(flat), d.shape[2])
            free[i, j] = False
            free[int(partners[i, j, m]), j] = False
    base = features.detach()

    def fn(values):
        return crl(base.masked_scatter(free, values), logits, labels)

    return torch.autograd.gradcheck(fn, (features.detach()[free].requires_grad_(),))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(mode, form):
    problem = make_problem(21, 14, (2, 3), 3, False, "list", skew=1.5)
    features, logits, labels, _, _ = problem.inputs()
    assert gradcheck_crl(crl_ops.CRL(mode=mode, form=form, k=3, bins=7, backend="reference"), features, logits, labels)


def test_stats_summary():
    problem = make_problem(2, 24, (2, 4), 3, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs()
    crl = crl_ops.CRL(backend="reference")
    assert crl.last_stats is None
    crl(features, logits, labels)
    summary = crl.last_stats.summary()
    mined = crl_ops.mine(features, logits, labels, backend="reference")
    pos = (mined.positives >= 0).sum(-1)
    neg = (mined.negatives >= 0).sum(-1)
    assert summary["anchors"] == int(mined.anchors.sum())
    assert summary["triplets"] == int((pos * neg).sum())
    assert summary["positive_pairs"] == int(pos.sum()) and summary["negative_pairs"] == int(neg.sum())
    counts, active = crl_ops.profile_minority(labels, (2, 4), backend="reference")
    assert torch.equal(crl.last_stats.active, active)
    expected = [sorted(m) for _, m, _ in oracle.profile(labels.tolist(), (2, 4))]
    assert summary["minority_classes"] == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    problem = make_problem(8, 24, (2, 3), 4, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(dtype)
    full, _, _, _, _ = problem.inputs(torch.float32)
    for form in FORMS:
        crl = crl_ops.CRL(form=form, backend="reference")
        low = crl(features, logits, labels)
        assert low.dtype == torch.float32
        low.backward()
        assert features.grad.dtype == dtype and torch.isfinite(features.grad).all()
        features.grad = None
        # Mining on rounded features may differ, so compare on the same mined pairs.
        partners = torch.cat(crl_ops.mine(features, logits, labels, backend="reference")[1:], -1)
        d_low, _ = crl_ops.reference.pair_distances(features.detach(), partners)
        d_full, _ = crl_ops.reference.pair_distances(features.detach().float(), partners)
        torch.testing.assert_close(d_low, d_full)


def test_balanced_loss_weight():
    problem = make_problem(9, 20, (2, 3), 3, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs()
    plain = crl_ops.BalancedLoss(weight=1.0, backend="reference")
    heavy = crl_ops.BalancedLoss(weight=3.0, backend="reference")
    a, b = plain(features, logits, labels), heavy(features, logits, labels)
    torch.testing.assert_close(b - a, 2.0 * plain.last_crl)
    torch.testing.assert_close(crl_ops.cross_entropy(logits, labels), plain.last_ce)


def test_class_balanced_accuracy():
    labels = torch.tensor([[0, 1], [0, -1], [0, 2], [1, 2], [1, -1]])
    preds = torch.tensor([[0, 1], [1, 0], [0, 0], [1, 2], [0, 0]])
    result = crl_ops.class_balanced_accuracy(preds, labels, (2, 3))
    # attribute 0: recall(0) = 2/3, recall(1) = 1/2; attribute 1: recall(1) = 1, recall(2) = 1/2, class 0 absent
    expected = torch.tensor([(2 / 3 + 1 / 2) / 2, (1 + 1 / 2) / 2], dtype=torch.float64)
    torch.testing.assert_close(result.per_attribute, expected)
    torch.testing.assert_close(result.mean, expected.mean())
    none_annotated = crl_ops.class_balanced_accuracy(torch.zeros(3, 2, dtype=torch.long),
                                                     torch.tensor([[0, -1], [1, -1], [1, -1]]), 2)
    assert torch.isnan(none_annotated.per_attribute[1]) and none_annotated.mean.item() == 0.5
