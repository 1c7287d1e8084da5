"""Mixed precision: under torch.autocast the loss's own arithmetic stays float32, and a model
trained under autocast gets the float32 loss to within the rounding of its half-precision outputs.
"""
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import crl_ops
from crl_ops import reference

from .problems import CPU_BACKENDS, FORMS, MODES, AttributeNet

NUM_CLASSES = (2, 3, 4)
BINS = 10
# End-to-end tolerance (relative) for the model's half-precision outputs. bfloat16 keeps 8
# significant bits, so each rounding is off by at most 2^-9 = 0.2% relative, float16 (11 bits)
# 2^-12. A linear layer rounds its input, weight and output, so a feature or logit is off by up to
# about 3 such roundings; the loss terms (hinges, squared distances, histogram weights and the
# log-softmax) change by about as much relative to their size. Measured on this problem over 15
# seeds and the six variants: at most 0.33% (bfloat16), 0.045% (float16). Allowed: 4 times the
# 3-rounding bound, 2.3% and 0.29%.
END_TO_END_RTOL = {torch.bfloat16: 4 * 3 * 2**-9, torch.float16: 4 * 3 * 2**-12}


def Net():
    return AttributeNet(6, NUM_CLASSES, dim=8)


def _data(batch_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 6, generator=g)
    labels = torch.stack([
        torch.multinomial(torch.softmax(2 * torch.randn(c, generator=g), 0), batch_size, replacement=True, generator=g)
        for c in NUM_CLASSES
    ], 1)
    return x, labels


def _balanced_loss(mode, form, backend):
    return crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=BINS, backend=backend)


def _crl_on_pairs(features, partners, form):
    """l_crl of float features on given mined pairs (the reference's loss forms, default margins)."""
    d, _ = reference.pair_distances(features, partners)
    margins = torch.tensor([2 * math.pi / c for c in NUM_CLASSES])
    return reference.reduce_sums(form, reference.form_sums(form, d, partners, margins, 1.0, BINS), "pooled")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_loss_arithmetic_stays_float32(mode, form, backend, dtype):
    # Half-precision model outputs, loss under autocast == float32 loss of the same values outside it.
    torch.manual_seed(0)
    model = Net()
    x, labels = _data()
    with torch.autocast("cpu", dtype):
        features, logits = model(x)
        assert features.dtype == dtype and logits[0].dtype == dtype
        features = features.detach().requires_grad_()
        logits = [lg.detach().requires_grad_() for lg in logits]
        loss_fn = _balanced_loss(mode, form, backend)
        loss = loss_fn(features, logits, labels)
        assert loss.dtype == torch.float32
        grads = torch.autograd.grad(loss, [features, *logits])
    assert loss_fn.last_stats.summary()["triplets"] > 0

    upcast = [t.detach().float().requires_grad_() for t in (features, *logits)]
    expected = _balanced_loss(mode, form, backend)(upcast[0], upcast[1:], labels)
    expected_grads = torch.autograd.grad(expected, upcast)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)  # float32 throughout: summation order only
    for grad, want in zip(grads, expected_grads):
        assert grad.dtype == dtype
        # The half-precision gradient is the float32 one rounded once: off by 2^-9 (bf16) relative at most.
        torch.testing.assert_close(grad.float(), want, rtol=2**-8, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_autocast_training_matches_float32(mode, form, backend, dtype):
    torch.manual_seed(0)
    model = Net()
    x, labels = _data()
    loss_fn = _balanced_loss(mode, form, backend)
    with torch.autocast("cpu", dtype):
        features, logits = model(x)
        loss = loss_fn(features, logits, labels)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Rounding may change which pairs are mined; compare on the pairs mined under autocast.
    with torch.autocast("cpu", dtype), torch.no_grad():
        mined = crl_ops.mine(*model(x), labels, mode, k=3, backend=backend)
    partners = torch.cat([mined.positives, mined.negatives], -1)
    assert (partners >= 0).any()
    with torch.no_grad():
        features32, logits32 = model(x)
    rtol = END_TO_END_RTOL[dtype]
    torch.testing.assert_close(loss_fn.last_crl, _crl_on_pairs(features32, partners, form), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(loss_fn.last_ce, crl_ops.cross_entropy(logits32, labels), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_under_autocast(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    loss_fn = _balanced_loss("instance", "relative", backend)

    def step(x, labels):
        with torch.autocast("cpu", torch.bfloat16):
            features, logits = model(x)
            return loss_fn(features, logits, labels)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for seed in range(3):
        x, labels = _data(seed=seed)
        got = compiled(x, labels)
        got.backward()
        torch.testing.assert_close(got, step(x, labels), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    torch._dynamo.reset()
