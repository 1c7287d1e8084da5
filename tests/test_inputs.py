"""Every bad input raises a ValueError or TypeError that names the argument; accepted formats agree."""
import math

import pytest
import torch

import crl_ops
from crl_ops import _native

B, A, D = 12, 3, 4


def good():
    torch.manual_seed(0)
    features = torch.randn(B, A, D)
    logits = torch.randn(B, A, 2)
    labels = torch.randint(0, 2, (B, A))
    return features, logits, labels


def call(features, logits, labels, backend="reference", **kwargs):
    return crl_ops.CRL(backend=backend, **kwargs)(features, logits, labels)


@pytest.mark.parametrize(
    "mutate, error, words",
    [
        (lambda f, lg, lb: (f[:-1], lg, lb), ValueError, "features"),
        (lambda f, lg, lb: (f, lg[:-1], lb), ValueError, "logits"),
        (lambda f, lg, lb: (f, lg, lb[:-1]), ValueError, "batch size"),
        (lambda f, lg, lb: (f[None], lg, lb), ValueError, "features"),
        (lambda f, lg, lb: (f, lg[None], lb), ValueError, "logits"),
        (lambda f, lg, lb: (f, lg, lb[None]), ValueError, "labels"),
        (lambda f, lg, lb: (f[:, :2], lg, lb), ValueError, "A="),
        (lambda f, lg, lb: (f, lg, lb.float()), TypeError, "labels"),
        (lambda f, lg, lb: (f, lg, lb.bool()), TypeError, "labels"),
        (lambda f, lg, lb: (f.long(), lg, lb), TypeError, "features"),
        (lambda f, lg, lb: (f, lg.long(), lb), TypeError, "logits"),
        (lambda f, lg, lb: (f.numpy(), lg, lb), TypeError, "features"),
        (lambda f, lg, lb: (f, lg, lb.masked_fill(lb == 0, 2)), ValueError, "labels"),
        (lambda f, lg, lb: (f, lg, lb.masked_fill(lb == 0, -2)), ValueError, "labels"),
        (lambda f, lg, lb: (f, [lg[:, j] for j in range(A - 1)], lb), ValueError, "list of 2"),
        (lambda f, lg, lb: (f, [lg[:, j, :1] for j in range(A)], lb), ValueError, r"logits\[0\]"),
        (lambda f, lg, lb: (f, lg[:, :, :1], lb), ValueError, "logits"),
        (lambda f, lg, lb: (f, lg[:, :2, 0], lb), ValueError, "logits"),
        (lambda f, lg, lb: (f.index_fill(0, torch.tensor([3]), math.nan), lg, lb), ValueError, "features"),
        (lambda f, lg, lb: (f.index_fill(0, torch.tensor([3]), math.inf), lg, lb), ValueError, "features"),
        (lambda f, lg, lb: (f, lg.index_fill(0, torch.tensor([1]), math.nan), lb), ValueError, "logits"),
        (lambda f, lg, lb: (f.to("meta"), lg, lb), ValueError, "device"),
        (lambda f, lg, lb: (f, lg, lb.to("meta")), ValueError, "device"),
    ],
)
def test_bad_inputs(mutate, error, words):
    with pytest.raises(error, match=words):
        call(*mutate(*good()))


def test_label_error_names_position_and_range():
    features, logits, labels = good()
    labels[5, 1] = 7
    with pytest.raises(ValueError, match=r"labels\[5, 1\] = 7 .* attribute 1: expected -1 .* 0\.\.1"):
        call(features, logits, labels)


def test_mixed_class_counts_checked_per_attribute():
    features, _, labels = good()
    logits = [torch.randn(B, 2), torch.randn(B, 5), torch.randn(B, 3)]
    labels[0, 0] = 3  # valid for attribute 1, not for attribute 0
    with pytest.raises(ValueError, match=r"attribute 0"):
        call(features, logits, labels)
    labels[0, 0] = 1
    labels[0, 1] = 4
    call(features, logits, labels)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"mode": "sample"}, ValueError, "mode"),
        ({"form": "hinge"}, ValueError, "form"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"bins": 1}, ValueError, "bins"),
        ({"apc_margin": -1.0}, ValueError, "apc_margin"),
        ({"margin": "big"}, TypeError, "margin"),
        ({"margin": math.nan}, ValueError, "margin"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        crl_ops.CRL(**kwargs)


def test_margin_per_attribute_length():
    with pytest.raises(ValueError, match="margin has 2 values"):
        call(*good(), margin=[1.0, 2.0])


def test_mine_and_profile_check_arguments():
    features, logits, labels = good()
    with pytest.raises(ValueError, match="k must be >= 1"):
        crl_ops.mine(features, logits, labels, k=0)
    with pytest.raises(ValueError, match="mode"):
        crl_ops.mine(features, logits, labels, mode="both")
    with pytest.raises(ValueError, match="num_classes has 2 entries"):
        crl_ops.profile_minority(labels, (2, 2))
    with pytest.raises(ValueError, match=r"labels\[0, 0\]"):
        crl_ops.profile_minority(torch.full((4, 3), 5), 3)


def test_native_backend_unavailable_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_native, "_LOAD_ERROR", "No module named 'crl_ops._C'")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        call(*good(), backend="native")
    # auto falls back to the reference
    assert torch.isfinite(crl_ops.CRL(backend="auto")(*good()))


def test_accepted_formats_agree():
    torch.manual_seed(1)
    z = torch.randn(B, A, dtype=torch.float64)
    labels = (torch.rand(B, A) < 0.3).long()
    shared = torch.randn(B, D, dtype=torch.float64)
    per_attribute = shared[:, None].expand(B, A, D).clone()
    two_class = torch.stack([torch.zeros_like(z), z], -1)
    losses = [
        call(shared, z, labels),
        call(per_attribute, z, labels),
        call(per_attribute, two_class, labels),
        call(per_attribute, list(two_class.unbind(1)), labels),
    ]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])
    single = [call(per_attribute[:, 0], two_class[:, 0], labels[:, 0]),
              call(per_attribute[:, :1], z[:, :1], labels[:, :1])]
    torch.testing.assert_close(single[0], single[1])


def test_validate_false_skips_value_checks():
    features, logits, labels = good()
    features[0, 0, 0] = math.nan
    crl = crl_ops.CRL(backend="reference", validate=False)
    crl(features, logits, labels)  # no error: the caller opted out
