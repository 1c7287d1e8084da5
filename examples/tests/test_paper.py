"""The reproduction's shared package (examples/paper): networks, methods, training loop, reports; and the
library's imbalance tools it builds on (crl_ops.balancing, class counts and imbalance ratios)."""
import math

import pytest
import torch
from torch.utils.data import TensorDataset

import crl_ops
from crl_ops.balancing import DownSampler, OverSampler, balancing_weights, sample_weights, weighted_cross_entropy
from crl_ops.metrics import class_counts, imbalance_ratios
from paper import reporting
from paper.models import CelebANet, CompactAttributeNet, PerAttributeLinear, XDomainNet
from paper.training import (
    METHODS,
    Checkpoint,
    Method,
    TrainingConfig,
    fit,
    make_objective,
    make_sampler,
    predictions,
)


def long_tail_labels():
    """One attribute 900 : 90 : 10, one binary 700 : 300 with 100 unannotated entries."""
    first = torch.cat([torch.zeros(900), torch.ones(90), torch.full((10,), 2)]).long()
    second = (torch.arange(1000) % 10 < 3).long()
    second[::10] = -1
    return torch.stack([first, second], 1), (3, 2)


# ---- metrics -----------------------------------------------------------------------------------------


def test_class_counts_and_imbalance_ratios():
    labels = torch.tensor([[0, 1, -1], [0, 1, -1], [0, 0, -1], [1, -1, -1]])
    assert class_counts(labels, (2, 4, 2)).tolist() == [[3, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0]]
    ratios = imbalance_ratios(labels, (2, 4, 2))
    assert ratios[:2].tolist() == [3.0, 2.0]  # absent classes do not count
    assert math.isnan(ratios[2])  # nothing annotated
    with pytest.raises(ValueError, match="out of range"):
        imbalance_ratios(torch.tensor([[3]]), 2)


# ---- baselines ---------------------------------------------------------------------------------------


def test_balancing_weights_make_classes_equally_heavy():
    labels, num_classes = long_tail_labels()
    weights = balancing_weights(labels, num_classes)
    counts = class_counts(labels, num_classes).double()
    totals = weights * counts
    assert torch.allclose(totals[0], torch.full((3,), 1000 / 3, dtype=torch.float64))
    assert torch.allclose(totals[1, :2], torch.full((2,), 450.0, dtype=torch.float64))
    assert weights[1, 2] == 0  # padding class
    assert torch.allclose(totals.sum(1), counts.sum(1))  # mean weight 1 over annotated samples


def test_sample_weights_follow_the_rarest_value():
    labels, num_classes = long_tail_labels()
    weights = balancing_weights(labels, num_classes)
    per_sample = sample_weights(labels, num_classes)
    assert per_sample[999] == weights[0, 2]  # class 2 of attribute 0 dominates
    assert per_sample[0] == weights[0, 0]  # attribute 1 is not annotated for sample 0
    assert per_sample[1] == max(weights[0, 0], weights[1, 1])
    assert sample_weights(torch.tensor([[-1, -1], [0, 1]]), 2)[0] == 0


def test_weighted_cross_entropy_matches_the_definition():
    torch.manual_seed(0)
    labels = torch.tensor([[0, 2], [1, -1], [1, 0], [0, 1]])
    logits = [torch.randn(4, 2, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    assert torch.allclose(weighted_cross_entropy(logits[:1], labels[:, :1], torch.ones(1, 2)),
                          crl_ops.cross_entropy(logits[:1], labels[:, :1]))
    class_weights = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.5, 4.0]])
    loss = weighted_cross_entropy(logits, labels, class_weights)
    expected = 0.0
    for j in range(2):
        log_p = torch.log_softmax(logits[j], 1)
        rows = [i for i in range(4) if labels[i, j] >= 0]
        w = torch.stack([class_weights[j, labels[i, j]] for i in rows])
        expected = expected - (w * torch.stack([log_p[i, labels[i, j]] for i in rows])).sum() / w.sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits[1].grad[1].abs().sum() == 0  # unannotated entry
    binary = weighted_cross_entropy(torch.zeros(4, 2), labels.clamp(0, 1), class_weights[:, :2])
    assert torch.allclose(binary, torch.tensor(2 * math.log(2)))
    with pytest.raises(ValueError, match=r"class_weights must be a tensor \[A=2, >= 3\]"):
        weighted_cross_entropy(logits, labels, torch.ones(2, 2))


def test_over_sampler_balances_one_attribute():
    labels, num_classes = long_tail_labels()
    sampler = OverSampler(sample_weights(labels[:, :1], 3), generator=torch.Generator().manual_seed(0))
    assert len(sampler) == 1000
    drawn = torch.bincount(labels[list(sampler), 0], minlength=3)
    assert drawn.sum() == 1000 and drawn.min() > 280  # ~333 each, against 900 / 90 / 10 before
    assert len(OverSampler(torch.ones(5), num_samples=12)) == len(list(OverSampler(torch.ones(5), num_samples=12)))


def test_down_sampler_keeps_the_smallest_class_size_per_class():
    labels, _ = long_tail_labels()
    sampler = DownSampler(sample_weights(labels[:, :1], 3), generator=torch.Generator().manual_seed(0))
    epochs = []
    for _ in range(3):
        expected_length = len(sampler)
        epoch = list(sampler)
        assert len(epoch) == expected_length and len(set(epoch)) == len(epoch)
        assert torch.bincount(labels[epoch, 0], minlength=3).tolist() == [10, 10, 10]
        epochs.append(set(epoch))
    assert epochs[0] != epochs[1]  # a fresh subset of the majority classes every epoch


@pytest.mark.parametrize("weights", [torch.tensor([]), torch.zeros(3), torch.tensor([1.0, -1.0]),
                                     torch.tensor([1.0, float("nan")]), torch.ones(2, 2)])
def test_samplers_reject_bad_weights(weights):
    with pytest.raises(ValueError, match="weights must be"):
        DownSampler(weights)
    with pytest.raises(ValueError, match="weights must be"):
        OverSampler(weights)


# ---- methods and objectives --------------------------------------------------------------------------


def test_the_methods_of_the_benchmark():
    assert list(METHODS)[:14] == ["ce", "oversample", "downsample", "costsensitive", "classbalanced", "focal",
                                  "logitadjust", "ldam-drw", "crl-c-a", "crl-c-r", "crl-c-d", "crl-i-a", "crl-i-r",
                                  "crl-i-d"]
    assert {"oversample+crl-i-r", "logitadjust+crl-i-r", "logitadjust+crl-i-r@0.3", "crl-i-r-norm"} <= set(METHODS)
    assert METHODS["crl-i-r"].label == "CRL(I+R)" and METHODS["costsensitive"].label == "Cost-Sensitive"
    assert Method(baseline="oversample", crl=True, mode="class", form="absolute").name == "oversample+crl-c-a"
    with pytest.raises(ValueError, match="baseline must be None or one of"):
        Method(baseline="smote")
    with pytest.raises(ValueError, match="mode must be one of"):
        Method(crl=True, mode="batch")


def test_objectives_and_samplers_of_the_methods():
    labels, num_classes = long_tail_labels()
    torch.manual_seed(0)
    features, logits = torch.randn(1000, 2, 4), [torch.randn(1000, 3), torch.randn(1000, 2)]
    ce = make_objective(METHODS["ce"], labels, num_classes)
    assert torch.allclose(ce(features, logits, labels), crl_ops.cross_entropy(logits, labels))
    costly = make_objective(METHODS["costsensitive"], labels, num_classes)
    assert torch.allclose(costly(features, logits, labels),
                          weighted_cross_entropy(logits, labels, balancing_weights(labels, num_classes)))
    crl = make_objective(METHODS["crl-c-a"], labels, num_classes, crl_weight=0.5)
    expected = crl_ops.cross_entropy(logits, labels) + 0.5 * crl_ops.CRL("class", "absolute")(features, logits, labels)
    assert torch.allclose(crl(features, logits, labels), expected)
    assert set(crl.last) == {"cls", "crl"}
    assert make_sampler(METHODS["crl-i-r"], labels, num_classes) is None
    assert isinstance(make_sampler(METHODS["oversample"], labels, num_classes), OverSampler)
    assert isinstance(make_sampler(METHODS["downsample"], labels, num_classes), DownSampler)


def test_predictions_from_every_logits_format():
    assert predictions(torch.tensor([[0.5, -0.1]])).tolist() == [[1, 0]]
    assert predictions([torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([[3.0, 1.0]])]).tolist() == [[1, 0]]
    assert predictions(torch.tensor([[[0.0, 1.0], [2.0, 1.0]]])).tolist() == [[1, 0]]


# ---- networks ----------------------------------------------------------------------------------------


def test_per_attribute_linear_is_one_linear_map_per_attribute():
    torch.manual_seed(0)
    layer = PerAttributeLinear(3, 5, 2)
    shared, separate = torch.randn(4, 5), torch.randn(4, 3, 5)
    for j in range(3):
        assert torch.allclose(layer(shared)[:, j], shared @ layer.weight[j] + layer.bias[j], atol=1e-6)
        assert torch.allclose(layer(separate)[:, j], separate[:, j] @ layer.weight[j] + layer.bias[j], atol=1e-6)


def test_celeba_net_shapes_and_input_checks():
    model = CelebANet()
    assert model.input_size == (3, 55, 47)
    features, logits = model(torch.randn(2, *model.input_size))
    assert features.shape == (2, 40, 64) and logits.shape == (2, 40)
    loss = crl_ops.BalancedLoss()(features, logits, torch.randint(0, 2, (2, 40)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 55, 47\], got \[2, 3, 64, 64\]"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(TypeError, match="images must be a float tensor"):
        model(torch.zeros(2, 3, 55, 47, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_attributes must be >= 1"):
        CelebANet(num_attributes=0)


def test_xdomain_net_branches():
    model = XDomainNet(num_classes=(3, 5, 2), feature_dim=8, branch_dim=16)
    features, logits = model(torch.randn(2, 3, 127, 131))
    assert features.shape == (2, 3, 8) and [lg.shape for lg in logits] == [(2, 3), (2, 5), (2, 2)]
    assert sum(XDomainNet().num_classes) == 178 and len(XDomainNet().num_classes) == 9
    with pytest.raises(ValueError, match=r"H>=127"):
        model(torch.randn(1, 3, 100, 300))
    with pytest.raises(ValueError, match=r"num_classes\[1\] must be >= 2"):
        XDomainNet(num_classes=(3, 1))
    with pytest.raises(TypeError, match="num_classes must be a non-empty sequence"):
        XDomainNet(num_classes=5)


def test_compact_net_and_its_input_size():
    model = CompactAttributeNet((1, 8, 8), (10, 3, 2))
    features, logits = model(torch.randn(5, 1, 8, 8))
    assert features.shape == (5, 3, 32) and [lg.shape[1] for lg in logits] == [10, 3, 2]
    with pytest.raises(ValueError, match="multiples of 4"):
        CompactAttributeNet((3, 10, 16), (2,))


# ---- training loop -----------------------------------------------------------------------------------


def _tiny_training_set():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(40, 1, 8, 8, generator=generator)
    labels = torch.stack([torch.arange(40) % 4, (torch.arange(40) % 5 == 0).long()], 1)
    return TensorDataset(images, labels), labels, (4, 2)


def test_fit_resumes_exactly_where_it_stopped(tmp_path):
    dataset, labels, num_classes = _tiny_training_set()
    config = TrainingConfig(epochs=2, batch_size=16, lr=0.05, log_every=2)
    method = METHODS["oversample"]  # the sampler's random state must survive the interruption too
    torch.manual_seed(0)
    straight = fit(CompactAttributeNet((1, 8, 8), num_classes), dataset, labels, num_classes, method, config,
                   tmp_path / "straight")
    torch.manual_seed(0)
    fit(CompactAttributeNet((1, 8, 8), num_classes), dataset, labels, num_classes, method,
        TrainingConfig(epochs=1, batch_size=16, lr=0.05, log_every=2), tmp_path / "resumed")
    torch.manual_seed(1)  # the resumed run must not depend on the fresh initial weights
    resumed = fit(CompactAttributeNet((1, 8, 8), num_classes), dataset, labels, num_classes, method, config,
                  tmp_path / "resumed", resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    rows = (tmp_path / "resumed" / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,loss,cls,crl,seconds" and {r.split(",")[0] for r in rows[1:]} == {"1", "2"}
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        fit(CompactAttributeNet((1, 8, 8), num_classes), dataset, labels, num_classes, method, config,
            tmp_path / "empty", resume=True)
    assert Checkpoint(tmp_path / "straight").path.is_file()


# ---- reports -----------------------------------------------------------------------------------------


def test_attribute_table_sorts_by_imbalance_and_splits_blocks():
    text = reporting.attribute_table(["a", "b", "c"], [5.0, 1.0, 40.0], {"CE": [0.5, 0.25, None]},
                                     {"CE": (0.4, 0.01)}, block=2)
    first, second = text.strip().split("\n\n")
    assert first.splitlines()[0] == "| Methods | b | a |" and first.splitlines()[3] == "| CE | 25.0 | 50.0 |"
    assert second.splitlines()[0] == "| Methods | c | Average |"
    assert second.splitlines()[2] == "| Imbalance ratio (1:x) | 40 |  |"
    assert second.splitlines()[3] == "| CE |  | 40.0 ± 1.0 |"


def test_variant_table_is_table_4s_grid():
    gains = {"X": {("class", "absolute"): 0.0571, ("instance", "relative"): (0.0585, 0.001)}}
    lines = reporting.variant_table(gains).splitlines()
    assert lines[0] == "| Loss function | X A | X R | X D |"
    assert lines[2] == "| Class level | +5.71 |  |  |"
    assert lines[3] == "| Instance level |  | +5.85 ± 0.10 |  |"


def test_paired_gains_and_plot(tmp_path):
    runs = {"ce": [[0.5, 0.6], [0.4, 0.5]], "crl": [[0.7, 0.6], [0.4, 0.8]]}
    gains = reporting.paired_gains(runs, "ce")
    assert list(gains) == ["crl"] and torch.allclose(torch.tensor(gains["crl"]), torch.tensor([[0.2, 0.0], [0.0, 0.3]]))
    mean, std = reporting.mean_std([1.0, 3.0])
    assert (mean, std) == (2.0, math.sqrt(2.0))
    path = tmp_path / "gains.png"
    reporting.plot_gains(str(path), ["a", "b"], [2.0, 1.0], {"CRL": [0.1, -0.05]}, "t", errors={"CRL": [0.01, 0.02]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
