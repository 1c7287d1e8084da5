"""The baselines of paper.losses and the methods built on them, against values worked out by hand."""
import math

import pytest
import torch

import crl_ops
from paper import losses
from paper.models import CompactAttributeNet
from paper.training import (
    METHODS,
    BaselineSettings,
    LDAMDeferredReweighting,
    Method,
    make_classification_loss,
    make_objective,
)


def test_class_logits_reads_every_format():
    z = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    binary = losses.class_logits(z, (2, 2))
    assert [lg.tolist() for lg in binary] == [[[0.0, 0.5], [0.0, 2.0]], [[0.0, -1.0], [0.0, 0.0]]]
    padded = torch.arange(12.0).reshape(2, 2, 3)
    assert [lg.shape[1] for lg in losses.class_logits(padded, (3, 2))] == [3, 2]
    assert losses.class_logits(padded[:, 0], (3,))[0].shape == (2, 3)
    with pytest.raises(ValueError, match="do not match num_classes"):
        losses.class_logits(torch.zeros(2, 5), (3, 3))


def test_logit_adjustment_is_cross_entropy_on_logits_plus_log_prior():
    # One attribute, priors 3/4 and 1/4, logits [1, 0], label 0 and label 1.
    counts = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    log_prior = losses.log_priors(counts)
    assert torch.allclose(log_prior, torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=torch.float64))
    logits = [torch.tensor([[1.0, 0.0], [1.0, 0.0]])]
    labels = torch.tensor([[0], [1]])
    loss = losses.logit_adjusted_cross_entropy(logits, labels, (2,), log_prior, tau=1.0)
    a, b = 0.75 * math.e, 0.25  # exp of the adjusted logits
    expected = (-math.log(a / (a + b)) - math.log(b / (a + b))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # tau = 0 is plain cross-entropy; tau = 1 is the balanced softmax -log(n_y e^z_y / sum_c n_c e^z_c).
    assert torch.allclose(losses.logit_adjusted_cross_entropy(logits, labels, (2,), log_prior, tau=0.0),
                          crl_ops.cross_entropy(logits, labels))
    balanced = -(torch.log(counts[0] * logits[0].double().exp() / (counts[0] * logits[0].double().exp()).sum(1,
                 keepdim=True)).gather(1, labels)).mean()
    assert loss.item() == pytest.approx(balanced.item(), rel=1e-6)


def test_logit_adjustment_of_binary_logits_matches_class_logits():
    torch.manual_seed(0)
    z = torch.randn(6, 3)
    labels = torch.tensor([[0, 1, -1], [1, 1, 0], [0, 0, 0], [1, -1, 1], [0, 1, 1], [1, 0, 0]])
    log_prior = losses.log_priors(losses.training_counts(labels, (2, 2, 2)))
    as_binary = losses.logit_adjusted_cross_entropy(z, labels, (2, 2, 2), log_prior)
    as_classes = losses.logit_adjusted_cross_entropy([torch.stack([torch.zeros(6), z[:, j]], 1) for j in range(3)],
                                                     labels, (2, 2, 2), log_prior)
    assert torch.allclose(as_binary, as_classes)


def test_focal_loss():
    torch.manual_seed(0)
    logits = [torch.randn(5, 3), torch.randn(5, 2)]
    labels = torch.tensor([[0, 1], [2, -1], [1, 0], [-1, 1], [2, 0]])
    assert torch.allclose(losses.focal_loss(logits, labels, (3, 2), gamma=0.0), crl_ops.cross_entropy(logits, labels))
    # One entry by hand: logits [0, log 3] and label 1, so p = 3/4 and the loss is -(1/4)^2 log(3/4).
    value = losses.focal_loss([torch.tensor([[0.0, math.log(3.0)]])], torch.tensor([[1]]), (2,), gamma=2.0)
    assert value.item() == pytest.approx(-(0.25 ** 2) * math.log(0.75), rel=1e-6)


def test_effective_number_weights():
    counts = torch.tensor([[100.0, 10.0, 1.0, 0.0]], dtype=torch.float64)
    beta = 0.9
    raw = [(1 - beta) / (1 - beta ** n) for n in (100, 10, 1)]
    expected = [3 * r / sum(raw) for r in raw] + [0.0]
    assert torch.allclose(losses.effective_number_weights(counts, beta), torch.tensor([expected], dtype=torch.float64))
    assert torch.allclose(losses.effective_number_weights(counts, 0.0)[0, :3], torch.ones(3, dtype=torch.float64))
    # beta -> 1: the effective number is the count, so the weights are the inverse frequencies.
    inverse = torch.tensor([1 / 100, 1 / 10, 1.0], dtype=torch.float64)
    assert torch.allclose(losses.effective_number_weights(counts, 1 - 1e-9)[0, :3], 3 * inverse / inverse.sum(),
                          rtol=1e-5)


def test_ldam_margins_and_adjusted_logits():
    counts = torch.tensor([[16.0, 1.0, 81.0], [4.0, 4.0, 0.0]], dtype=torch.float64)
    margins = losses.ldam_margins(counts, max_margin=0.5)
    # n^(-1/4) = 1/2, 1, 1/3: the rarest class (n = 1) gets 0.5. The padding class of attribute 1 gets the maximum.
    assert torch.allclose(margins, torch.tensor([[0.25, 0.5, 0.5 / 3], [0.5, 0.5, 0.5]], dtype=torch.float64))
    logits = [torch.zeros(2, 3), torch.zeros(2, 2)]
    labels = torch.tensor([[1, 0], [2, -1]])
    adjusted = losses.margin_adjusted_logits(logits, labels, (3, 2), margins)
    assert torch.allclose(adjusted[0], torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.0, -0.5 / 3]]))
    assert torch.allclose(adjusted[1], torch.tensor([[-0.5, 0.0], [0.0, 0.0]]))  # unannotated: unchanged


def test_ldam_drw_switches_to_effective_number_weights():
    labels = torch.tensor([[0]] * 9 + [[1]])
    loss = make_classification_loss("ldam-drw", labels, (2,), BaselineSettings(scale=30.0, drw_start=0.8))
    assert isinstance(loss, LDAMDeferredReweighting)
    counts = losses.training_counts(labels, (2,))
    logits = [torch.tensor([[2.0, 1.0], [0.5, 1.5]])]
    batch_labels = torch.tensor([[0], [1]])
    adjusted = losses.margin_adjusted_logits(logits, batch_labels, (2,), 30 * losses.ldam_margins(counts, 0.5))
    loss.progress = 0.5
    assert torch.allclose(loss(logits, batch_labels), crl_ops.cross_entropy(adjusted, batch_labels))
    loss.progress = 0.8
    weights = losses.effective_number_weights(counts, 0.9999)
    assert torch.allclose(loss(logits, batch_labels),
                          crl_ops.balancing.weighted_cross_entropy(adjusted, batch_labels, weights.float()))


def test_the_new_baseline_methods():
    labels = torch.tensor([[0, 1], [0, 0], [0, 1], [1, 0], [0, 2], [0, 0]])
    num_classes = (2, 3)
    torch.manual_seed(0)
    features, logits = torch.randn(6, 2, 4), [torch.randn(6, 2), torch.randn(6, 3)]
    counts = losses.training_counts(labels, num_classes)
    la = make_objective(METHODS["logitadjust"], labels, num_classes)
    assert torch.allclose(la(features, logits, labels),
                          losses.logit_adjusted_cross_entropy(logits, labels, num_classes, losses.log_priors(counts)))
    cb = make_objective(METHODS["classbalanced"], labels, num_classes)
    assert torch.allclose(cb(features, logits, labels), crl_ops.balancing.weighted_cross_entropy(
        logits, labels, losses.effective_number_weights(counts, 0.9999).float()))
    focal = make_objective(METHODS["focal"], labels, num_classes)
    assert torch.allclose(focal(features, logits, labels), losses.focal_loss(logits, labels, num_classes, 2.0))
    crl = crl_ops.CRL("instance", "relative")(features, logits, labels)
    la_crl = make_objective(METHODS["logitadjust+crl-i-r@0.3"], labels, num_classes)
    assert torch.allclose(la_crl(features, logits, labels), la(features, logits, labels) + 0.3 * crl)
    assert set(la_crl.last) == {"cls", "crl"} and torch.allclose(la_crl.last["crl"], 0.3 * crl)
    normalised = make_objective(METHODS["crl-i-r-norm"], labels, num_classes)
    expected = crl_ops.cross_entropy(logits, labels) + crl_ops.CRL("instance", "relative")(
        torch.nn.functional.normalize(features, dim=-1), logits, labels)
    assert torch.allclose(normalised(features, logits, labels), expected)
    for name, options in (("crl-i-r-attr", {"reduction": "attribute"}),
                          ("crl-c-r-score-m0.5", {"mode": "class", "distance": "score", "margin": 0.5})):
        expected = crl_ops.cross_entropy(logits, labels) + crl_ops.CRL(**options)(features, logits, labels)
        assert torch.allclose(make_objective(METHODS[name], labels, num_classes)(features, logits, labels), expected)


def test_the_journal_weighting():
    labels = torch.tensor([[0], [0], [0], [1]])
    torch.manual_seed(1)
    features, logits = torch.randn(4, 1, 3), [torch.randn(4, 2)]
    objective = make_objective(Method(crl=True, eta=0.8), labels, (2,))
    alpha = 0.8 * 0.25  # Omega_imb of 3:1 is 1/4: a quarter of the samples would have to change class
    assert objective.alpha == pytest.approx(alpha)
    expected = alpha * crl_ops.CRL()(features, logits, labels) + (1 - alpha) * crl_ops.cross_entropy(logits, labels)
    assert torch.allclose(objective(features, logits, labels), expected)


def test_method_names_labels_and_checks():
    assert Method(baseline="logitadjust", crl=True, normalize=True, crl_weight=0.3).name == \
        "logitadjust+crl-i-r-norm@0.3"
    assert METHODS["logitadjust+crl-i-r@0.3"].label == "Logit-Adjusted + CRL(I+R) ×0.3"
    assert Method(crl=True, mode="class", distance="score", reduction="attribute").name == "crl-c-r-attr-score"
    assert METHODS["ldam-drw"].cosine_classifier and not METHODS["logitadjust"].cosine_classifier
    with pytest.raises(ValueError, match="apply to CRL: set crl=True"):
        Method(normalize=True)
    assert METHODS["crl-c-r-score-m0.5"].label == "CRL(C+R) score m=0.5"
    assert Method(crl=True, threshold=0.75).name == "crl-i-r-rho0.75"
    with pytest.raises(ValueError, match="not both"):
        Method(crl=True, eta=1.0, crl_weight=0.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        Method(crl=True, reduction="sum")


def test_cosine_classifier_keeps_the_other_initial_weights():
    torch.manual_seed(0)
    plain = CompactAttributeNet((1, 8, 8), (3, 2))
    torch.manual_seed(0)
    cosine = CompactAttributeNet((1, 8, 8), (3, 2), cosine_scale=30.0)
    assert cosine.heads.output.bias is None
    for (name, a), (_, b) in zip(plain.named_parameters(), cosine.named_parameters()):
        assert torch.equal(a, b), name
    images = torch.randn(4, 1, 8, 8)
    features, logits = cosine(images)
    weight = cosine.heads.output.weight
    for j, c in enumerate((3, 2)):
        expected = 30 * torch.nn.functional.cosine_similarity(features[:, j, None, :], weight[j, :, :c].t()[None],
                                                              dim=-1)
        assert torch.allclose(logits[j], expected, atol=1e-5)
    with pytest.raises(ValueError, match="cosine_scale must be None or a positive float"):
        CompactAttributeNet((1, 8, 8), (3, 2), cosine_scale=0.0)
