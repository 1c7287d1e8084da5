"""The CPU kernels' mining, profiling and value checks, exactly: where every distance and
probability is exact (small integer features, logits drawn from a few rows), the mined rows equal
the reference's bitwise, ties and duplicates included, for K around the kernels' lane and list
sizes and beyond B; against the float64 oracle on random features; profiles equal the
reference's up to 10^5 classes; and the finiteness checks find a bad value wherever it is."""
import math

import pytest
import torch

import crl_ops
from crl_ops import _native, reference

from . import oracle

ops = torch.ops.crl_ops

pytestmark = pytest.mark.skipif(not crl_ops.native_available("cpu"), reason="native CPU kernels not built")

K_VALUES = (1, 5, 17, 32, 33, 64, 65, 200)


@pytest.fixture(autouse=True)
def _kernels():
    _native.require(torch.device("cpu"))


def _labels(generator, batch, classes, unannotated=0.1):
    """Skewed labels [B, A] (class c drawn with weight 1 / (c + 1)^1.5), some not annotated."""
    columns = []
    for c in classes:
        weights = torch.arange(1, c + 1, dtype=torch.float64) ** -1.5
        columns.append(torch.multinomial(weights, batch, replacement=True, generator=generator))
    labels = torch.stack(columns, 1)
    return labels.masked_fill(torch.rand(labels.shape, generator=generator) < unannotated, -1)


def _exact_problem(seed, batch, classes, dim, kind):
    """Features whose squared distances are exact in float16 and up (small integers): ties
    everywhere ("ties"), or repeated samples ("duplicates")."""
    generator = torch.Generator().manual_seed(seed)
    labels = _labels(generator, batch, classes)
    if kind == "ties":
        features = torch.randint(0, 3, (batch, len(classes), dim), generator=generator).double()
    else:
        base = torch.randint(-4, 5, (max(batch // 6, 1), len(classes), dim), generator=generator).double()
        features = base[torch.randint(0, base.shape[0], (batch,), generator=generator)]
    width = max(classes)
    logits = torch.randn(batch, len(classes), width, generator=generator, dtype=torch.float64)
    return features, logits, labels, torch.tensor(classes)


def _both(op, *args):
    return getattr(ops, op)(*args), getattr(reference, op)(*args)


def _assert_equal(native, expected):
    for got, want in zip(native, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("kind", ["ties", "duplicates"])
def test_instance_mining_equals_the_reference_on_exact_distances(k, kind):
    for n, (batch, classes, dim) in enumerate([(1, (2,), 3), (2, (2, 3), 1), (7, (3,), 2), (40, (2, 5, 2), 3),
                                               (300, (2, 9), 4), (1000, (2,), 2)]):
        features, logits, labels, num_classes = _exact_problem(10 * k + n, batch, classes, dim, kind)
        _, _, active = ops.profile(labels, num_classes, max(classes), 0.5, True)
        for dtype in (torch.float64, torch.float32, torch.float16):
            x = features.to(dtype)
            z = logits.to(dtype)
            for first, rows in ((0, batch), (batch // 3, batch - batch // 3)):
                args = (x, z, labels, num_classes, active, k, first, rows, True)
                _assert_equal(*_both("mine_instance", *args))


def test_instance_mining_reads_strided_features_and_binary_logits_exactly():
    features, _, labels, _ = _exact_problem(3, 500, (2, 2, 2), 6, "ties")
    labels = labels.clamp(max=1)
    num_classes = torch.tensor([2, 2, 2])
    binary = torch.randn(500, 3, generator=torch.Generator().manual_seed(4))
    _, _, active = ops.profile(labels, num_classes, 2, 0.5, True)
    strided = features.float().permute(2, 0, 1).contiguous().permute(1, 2, 0)  # D has the largest stride
    assert strided.stride(2) != 1
    for x in (strided, features.float()[:, :, ::2], features.float().expand(-1, -1, -1)):
        for k in (5, 64):
            _assert_equal(*_both("mine_instance", x, binary, labels, num_classes, active, k, 0, 500, True))


def test_instance_mining_at_b_5000():
    features, logits, labels, num_classes = _exact_problem(5, 5000, (3,), 3, "ties")
    _, _, active = ops.profile(labels, num_classes, 3, 0.5, True)
    for k in (5, 64):
        args = (features.float(), logits.float(), labels, num_classes, active, k, 0, 5000, True)
        _assert_equal(*_both("mine_instance", *args))


@pytest.mark.parametrize("k", K_VALUES)
def test_class_mining_equals_the_reference_on_tied_probabilities(k):
    """Logit rows drawn from four scaled ramps s * (0, 1, ..., C-1): equal rows tie exactly, and the
    probabilities of distinct rows are far apart, whatever exp and summation order either side uses."""
    for n, (batch, classes) in enumerate([(3, (2,)), (50, (2, 4)), (700, (3, 6, 2))]):
        generator = torch.Generator().manual_seed(100 * k + n)
        labels = _labels(generator, batch, classes)
        width = max(classes)
        scales = torch.tensor([-1.1, -0.3, 0.4, 1.3], dtype=torch.float64)[:, None, None]
        rows = scales * torch.arange(width, dtype=torch.float64).expand(1, len(classes), width)
        logits = rows[torch.randint(0, 4, (batch,), generator=generator)]
        num_classes = torch.tensor(classes)
        _, _, active = ops.profile(labels, num_classes, width, 0.5, True)
        for dtype in (torch.float64, torch.float32):
            for first, rows_ in ((0, batch), (batch // 2, batch - batch // 2)):
                _assert_equal(*_both("mine_class", logits.to(dtype), labels, num_classes, active, k, first, rows_,
                                     True))


@pytest.mark.parametrize("mode", ["instance", "class"])
@pytest.mark.parametrize("k", (1, 5, 33, 65))
def test_mined_sets_equal_the_float64_oracle(mode, k):
    generator = torch.Generator().manual_seed(k)
    batch, classes = 120, (2, 5, 3)
    labels = _labels(generator, batch, classes)
    features = torch.randn(batch, len(classes), 7, generator=generator, dtype=torch.float64)
    logits = [torch.randn(batch, c, generator=generator, dtype=torch.float64) for c in classes]
    mined = crl_ops.mine(features, logits, labels, mode, k, backend="native")
    expected = oracle.mine(features, logits, labels.tolist(), mode, k)
    anchors = {(i, j) for i, j in mined.anchors.nonzero().tolist()}
    assert anchors == set(expected)
    for (i, j), (positives, negatives) in expected.items():
        assert {p for p in mined.positives[i, j].tolist() if p >= 0} == positives
        assert {q for q in mined.negatives[i, j].tolist() if q >= 0} == negatives


def test_mining_does_not_depend_on_the_thread_count():
    generator = torch.Generator().manual_seed(7)
    labels = _labels(generator, 3000, (2, 4, 2, 3))
    features = torch.randn(3000, 4, 16, generator=generator)
    logits = torch.randn(3000, 4, 4, generator=generator)
    num_classes = torch.tensor([2, 4, 2, 3])
    _, _, active = ops.profile(labels, num_classes, 4, 0.5, True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append(ops.mine_instance(features, logits, labels, num_classes, active, 17, 0, 3000, True)
                        + ops.mine_class(logits, labels, num_classes, active, 17, 0, 3000, True))
    finally:
        torch.set_num_threads(threads)
    _assert_equal(runs[0], runs[1])


@pytest.mark.parametrize("classes", [2, 3, 40, 1000, 100_000])
def test_profile_equals_the_reference(classes):
    for n, batch in enumerate((1, 5, 64, 3000)):
        generator = torch.Generator().manual_seed(classes + n)
        num_classes = torch.tensor([classes, max(2, classes // 3)])
        labels = _labels(generator, batch, tuple(num_classes.tolist()), unannotated=0.3)
        labels[: batch // 4, 0] = classes - 1  # one large class, so that the counts spread
        for threshold in (0.5, 0.05, 1.0, 1 / 3):
            _assert_equal(*_both("profile", labels, num_classes, classes, threshold, True))


def test_profile_without_annotations_and_with_out_of_range_labels():
    labels = torch.full((20, 2), -1)
    _assert_equal(*_both("profile", labels, torch.tensor([4, 2]), 4, 0.5, True))
    labels[3, 1] = 2  # outside 0..1: not annotated without validate, an error with it
    _assert_equal(*_both("profile", labels, torch.tensor([4, 2]), 4, 0.5, False))
    with pytest.raises(ValueError, match=r"labels\[3, 1\] = 2 is out of range"):
        ops.profile(labels, torch.tensor([4, 2]), 4, 0.5, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_found_wherever_they_are(dtype, bad):
    batch, attributes, dim = 33, 3, 5
    labels = torch.zeros(batch, attributes, dtype=torch.long)
    none = torch.zeros(attributes, 3, dtype=torch.bool)
    num_classes = torch.tensor([3, 2, 3])
    finite = torch.randn(batch, attributes, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    features = torch.randn(batch, attributes, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    for position in (0, 17, features.numel() - 1):
        for layout in ("contiguous", "strided"):
            x = features.clone()
            x.view(-1)[position] = bad
            if layout == "strided":
                x = x.transpose(0, 1).contiguous().transpose(0, 1)
            with pytest.raises(ValueError, match="features contain NaN or inf"):
                ops.mine_instance(x, finite, labels, num_classes, none, 1, 0, batch, True)
            ops.mine_instance(x, finite, labels, num_classes, none, 1, 0, batch, False)  # no check, no error
    for position in ((0, 0, 0), (batch - 1, 2, 2), (5, 1, 1)):
        z = finite.clone()
        z[position] = bad
        with pytest.raises(ValueError, match="logits contain NaN or inf"):
            ops.mine_class(z, labels, num_classes, none, 1, 0, batch, True)
    z = finite.clone()
    z[:, 1, 2] = bad  # past C_1 = 2: never read, so no error
    ops.mine_class(z, labels, num_classes, none, 1, 0, batch, True)
    binary = finite[:, :, 0].clone()
    binary[batch - 1, attributes - 1] = bad
    with pytest.raises(ValueError, match="logits contain NaN or inf"):
        ops.mine_class(binary, labels, torch.tensor([2, 2, 2]), none[:, :2], 1, 0, batch, True)
