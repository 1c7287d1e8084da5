"""Behaviours of sections 1-5, case by case, on every CPU backend (the reference and the native
kernels), against the float64 oracle (tests/oracle.py). The random cases are in test_properties.py."""
import pytest
import torch

import crl_ops

from . import oracle
from .checks import check_against_oracle, gradcheck_crl
from .problems import CPU_BACKENDS, FORMS, MODES, make_problem


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("margin", [0.5, (0.3, 1.0, 2.0)])
def test_margin_forms(margin, backend):
    problem = make_problem(3, 20, (2, 3, 4), 3, False, "list", skew=2.0)
    check_against_oracle(problem, "instance", "relative", 3, margin=margin, backend=backend)


def test_absolute_margin(backend):
    problem = make_problem(4, 20, (2, 5), 3, False, "list", skew=2.0)
    check_against_oracle(problem, "class", "absolute", 4, apc_margin=2.5, backend=backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_k_larger_than_candidates(mode, form, backend):
    problem = make_problem(2, 9, (2, 3), 2, False, "list", skew=1.0)  # anchors in both attributes
    loss_fn = check_against_oracle(problem, mode, form, k=50, backend=backend)
    assert (loss_fn.last_stats.num_anchors > 0).all()


@pytest.mark.parametrize("form", FORMS)
def test_no_minority_class_gives_connected_zero(form, backend):
    # Balanced labels: no class is below half of the batch, so nothing is mined.
    features = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(8, 2, dtype=torch.float64)
    labels = torch.tensor([[0, 1], [1, 0]] * 4)
    crl = crl_ops.CRL(form=form, backend=backend)
    loss = crl(features, logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and (features.grad == 0).all()
    assert crl.last_stats.num_anchors.sum() == 0


@pytest.mark.parametrize("mode", MODES)
def test_single_sample_class_is_not_an_anchor(mode, backend):
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])  # class 1 has one sample, class 2 two
    features = torch.randn(8, 4, dtype=torch.float64)
    logits = torch.randn(8, 3, dtype=torch.float64)
    counts, active = crl_ops.profile_minority(labels, 3, backend=backend)
    assert counts.tolist() == [[5, 1, 2]]
    assert active.tolist() == [[False, False, True]]
    mined = crl_ops.mine(features, logits, labels, mode=mode, backend=backend)
    assert mined.anchors[:, 0].nonzero().flatten().tolist() == [6, 7]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_zero_distance_has_zero_gradient(mode, form, backend):
    problem = make_problem(11, 16, (2, 2), 3, False, "list", skew=2.0, duplicates=6)
    check_against_oracle(problem, mode, form, k=4, backend=backend)
    features = torch.zeros(6, 1, 2, dtype=torch.float64, requires_grad=True)  # every distance is zero
    labels = torch.tensor([[0], [0], [0], [0], [1], [1]])
    logits = torch.zeros(6, 1, dtype=torch.float64)
    loss = crl_ops.CRL(mode=mode, form=form, backend=backend)(features, logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and (features.grad == 0).all()


def test_profile_strict_half_rule(backend):
    # n = 6: classes with 3 samples sum to exactly half, so neither is a minority.
    labels = torch.tensor([[0], [0], [0], [1], [1], [1]])
    _, active = crl_ops.profile_minority(labels, 2, backend=backend)
    assert not active.any()
    # Ties in count go to the lower class index first: 2 + 2 < 7/2 is false, so only class 0.
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    _, active = crl_ops.profile_minority(labels, 3, backend=backend)
    assert active.tolist() == [[True, False, False]]
    labels = torch.tensor([-1, -1, 0, 1, 1, 1, 1])  # unannotated samples do not count in n
    counts, active = crl_ops.profile_minority(labels, 2, backend=backend)
    assert counts.tolist() == [[1, 4]] and not active.any()


def test_binary_logit_zero_predicts_class_zero(backend):
    # Sample 3 (class 1) has z = 0: predicted class 0, so it is a misclassified positive.
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0], [5.0], [9.0], [10.0], [11.0]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    z = torch.tensor([[5.0], [0.0], [-1.0], [0.0], [0.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    mined = crl_ops.mine(features, z, labels[:, None], k=5, backend=backend)
    # anchor 0 (class 1): misclassified class-1 samples are 1 (z = 0) and 2 (z < 0)
    assert set(mined.positives[0, 0].tolist()) - {-1} == {1, 2}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(mode, form, backend):
    problem = make_problem(21, 14, (2, 3), 3, False, "list", skew=1.5)
    features, logits, labels, _, _ = problem.inputs()
    assert gradcheck_crl(crl_ops.CRL(mode=mode, form=form, k=3, bins=7, backend=backend), features, logits, labels)


def test_stats_summary(backend):
    problem = make_problem(2, 24, (2, 4), 3, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs()
    crl = crl_ops.CRL(backend=backend)
    assert crl.last_stats is None
    crl(features, logits, labels)
    summary = crl.last_stats.summary()
    mined = crl_ops.mine(features, logits, labels, backend=backend)
    pos = (mined.positives >= 0).sum(-1)
    neg = (mined.negatives >= 0).sum(-1)
    assert summary["anchors"] == int(mined.anchors.sum())
    assert summary["triplets"] == int((pos * neg).sum())
    assert summary["positive_pairs"] == int(pos.sum()) and summary["negative_pairs"] == int(neg.sum())
    counts, active = crl_ops.profile_minority(labels, (2, 4), backend=backend)
    assert torch.equal(crl.last_stats.active, active)
    expected = [sorted(m) for _, m, _ in oracle.profile(labels.tolist(), (2, 4))]
    assert summary["minority_classes"] == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype, backend):
    problem = make_problem(8, 24, (2, 3), 4, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs(dtype)
    full, _, _, _, _ = problem.inputs(torch.float32)
    for form in FORMS:
        crl = crl_ops.CRL(form=form, backend=backend)
        low = crl(features, logits, labels)
        assert low.dtype == torch.float32
        low.backward()
        assert features.grad.dtype == dtype and torch.isfinite(features.grad).all()
        features.grad = None
        # Mining on rounded features may differ, so compare on the same mined pairs.
        partners = torch.cat(crl_ops.mine(features, logits, labels, backend=backend)[1:], -1)
        d_low, _ = crl_ops.reference.pair_distances(features.detach(), partners)
        d_full, _ = crl_ops.reference.pair_distances(features.detach().float(), partners)
        torch.testing.assert_close(d_low, d_full)


def test_balanced_loss_weight(backend):
    problem = make_problem(9, 20, (2, 3), 3, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs()
    plain = crl_ops.BalancedLoss(weight=1.0, backend=backend)
    heavy = crl_ops.BalancedLoss(weight=3.0, backend=backend)
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


# ---- the options of section 3 and the journal version ----------------------------------------------------


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_minority_threshold(threshold, mode, backend):
    problem = make_problem(5, 30, (2, 3, 5), 3, False, "list", skew=2.0)
    check_against_oracle(problem, mode, "relative", 3, threshold=threshold, backend=backend)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_attribute_reduction(mode, form, backend):
    problem = make_problem(6, 30, (2, 3, 4), 3, False, "list", skew=2.0)
    check_against_oracle(problem, mode, form, 3, reduction="attribute", bins=9, backend=backend)


def test_attribute_reduction_weighs_attributes_equally(backend):
    # Attribute 0 has many triplets, attribute 1 few: the pooled mean follows attribute 0.
    problem = make_problem(7, 40, (2, 2), 3, False, "list", skew=2.5)
    features, logits, labels, _, _ = problem.inputs()
    pooled = crl_ops.CRL(backend=backend)
    per_attribute = crl_ops.CRL(reduction="attribute", backend=backend)
    pooled_loss, attribute_loss = pooled(features, logits, labels), per_attribute(features, logits, labels)
    triplets = pooled.last_stats.num_triplets.tolist()
    alone = [crl_ops.CRL(backend=backend)(features[:, j:j + 1], logits[j:j + 1], labels[:, j:j + 1]) for j in (0, 1)]
    torch.testing.assert_close(attribute_loss, (alone[0] + alone[1]) / 2)
    torch.testing.assert_close(pooled_loss, (alone[0] * triplets[0] + alone[1] * triplets[1]) / sum(triplets))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_normalized_features(mode, form, backend):
    problem = make_problem(8, 24, (2, 3), 4, False, "list", skew=2.0)
    check_against_oracle(problem, mode, form, 3, normalize=True, bins=7, backend=backend)


def test_normalized_shared_features(backend):
    problem = make_problem(9, 24, (2, 2, 2), 4, True, "binary", skew=2.0)
    check_against_oracle(problem, "instance", "relative", 3, normalize=True, backend=backend)


@pytest.mark.parametrize("reduction", ["pooled", "attribute"])
@pytest.mark.parametrize("margin", [None, 0.5])
def test_score_space_triplets(margin, reduction, backend):
    # The journal's class-level triplets on class probabilities: CRL's gradient reaches the logits.
    problem = make_problem(10, 24, (2, 3, 4), 3, False, "list", skew=2.0)
    check_against_oracle(problem, "class", "relative", 3, distance="score", margin=margin, reduction=reduction,
                         backend=backend)


@pytest.mark.parametrize("mode, form", [("instance", "relative"), ("class", "absolute"), ("class", "distribution")])
def test_score_space_is_for_class_level_triplets(mode, form):
    with pytest.raises(ValueError, match='distance="score" is defined for mode="class" with form="relative"'):
        crl_ops.CRL(mode, form, distance="score")


def test_alpha_mixes_the_terms(backend):
    problem = make_problem(11, 24, (2, 3), 3, False, "list", skew=2.0)
    check_against_oracle(problem, "instance", "relative", 3, alpha=0.3, backend=backend)


def test_tensor_margin_gets_its_gradient(backend):
    problem = make_problem(12, 30, (2, 3, 4), 3, False, "list", skew=2.0)
    margin = torch.tensor([0.1, 0.4, 2.0], dtype=torch.float64, requires_grad=True)
    check_against_oracle(problem, "instance", "relative", 3, margin=margin, backend=backend)
    scalar = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    check_against_oracle(problem, "class", "relative", 3, margin=scalar, reduction="attribute", backend=backend)


def test_margin_parameter_moves_with_the_module(backend):
    margin = torch.nn.Parameter(torch.tensor([0.5, 0.5], dtype=torch.float64))
    crl = crl_ops.CRL(margin=margin, backend=backend)
    assert list(crl.parameters()) == [margin]
    problem = make_problem(13, 20, (2, 2), 3, False, "list", skew=2.0)
    features, logits, labels, _, _ = problem.inputs()
    crl(features, logits, labels).backward()
    assert margin.grad is not None and (margin.grad > 0).any()


def test_imbalance_measure():
    labels = torch.tensor([[0, 0, -1], [0, 1, -1], [0, 1, -1], [1, 1, -1]])  # 3:1, 1:3:0, none annotated
    got = crl_ops.imbalance_measure(labels, (2, 3, 2))
    # attribute 0: 3/4 - 1/2; attribute 1 (3 classes, class 2 absent): only class 1 is above 1/3
    torch.testing.assert_close(got[:2], torch.tensor([0.25, 3 / 4 - 1 / 3], dtype=torch.float64))
    assert torch.isnan(got[2])
    one_class = crl_ops.imbalance_measure(torch.zeros(10, dtype=torch.long), 4)
    torch.testing.assert_close(one_class, torch.tensor([0.75], dtype=torch.float64))
