"""torch.compile: a model with BalancedLoss compiles into one graph (fullgraph=True: no graph break
anywhere), is not recompiled when only the label mix of a batch changes, and trains exactly as in
eager mode. aot_eager for every backend, mode and form; one inductor run per backend."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import crl_ops

from .problems import CPU_BACKENDS, FORMS, MODES, AttributeNet

NUM_CLASSES = (2, 3, 4)
INPUT_SIZE = 6


def Net():
    return AttributeNet(INPUT_SIZE, NUM_CLASSES, dim=4)


def _label_mixes(batch_size, seed=0):
    """Batches of one shape whose minority classes differ, one with an attribute that has none."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for skew in (3.0, 1.0, 0.0, 2.0):
        columns = []
        for c in NUM_CLASSES:
            weights = torch.softmax(skew * torch.randn(c, generator=g), 0)
            columns.append(torch.multinomial(weights, batch_size, replacement=True, generator=g))
        labels = torch.stack(columns, 1)
        labels[torch.rand(batch_size, len(NUM_CLASSES), generator=g) < 0.1] = -1
        batches.append((torch.randn(batch_size, INPUT_SIZE, generator=g), labels))
    batches[2][1][:, 0] = torch.arange(batch_size) % 2  # attribute 0 balanced: nothing to mine there
    return batches


def _train(model, criterion, step, batches):
    """SGD steps; the losses and mining statistics of each step."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for x, labels in batches:
        loss = step(model, criterion, x, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append((loss.detach(), criterion.last_stats.summary()))
    return history


def _loss_step(model, criterion, x, labels):
    features, logits = model(x)
    return criterion(features, logits, labels)


def _compare_with_eager(compiler, mode, form, backend, batches, rtol=1e-6, atol=1e-6):
    """Trains a copy of one model eagerly and with `compiler`; returns how many graphs were compiled."""
    torch.manual_seed(0)
    eager_model = Net()
    compiled_model = copy.deepcopy(eager_model)
    def criterion():
        return crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=10, backend=backend)

    counter = CompileCounterWithBackend(compiler)
    compiled_step = torch.compile(_loss_step, backend=counter, fullgraph=True)
    compiled = _train(compiled_model, criterion(), compiled_step, batches)
    eager = _train(eager_model, criterion(), _loss_step, batches)
    assert any(stats["triplets"] > 0 for _, stats in eager)
    for (eager_loss, eager_stats), (compiled_loss, compiled_stats) in zip(eager, compiled):
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=rtol, atol=atol)
        assert compiled_stats == eager_stats
    for p_eager, p_compiled in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=rtol, atol=atol)
    return counter.frame_count


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # every test counts its own compilations
    crl_ops._inputs._CONSTANTS.clear()  # compiled code must not rely on what eager calls cached
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_one_graph_for_all_label_mixes(mode, form, backend):
    assert _compare_with_eager("aot_eager", mode, form, backend, _label_mixes(16)) == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_smaller_last_batch_compiles_once_more(backend):
    # The second batch size makes dynamo compile one graph with a dynamic batch size, used from then on.
    batches = _label_mixes(16)[:2] + _label_mixes(11, seed=1)[:1] + _label_mixes(13, seed=2)[:1]
    assert _compare_with_eager("aot_eager", "instance", "relative", backend, batches) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inductor(backend):
    assert _compare_with_eager("inductor", "instance", "distribution", backend, _label_mixes(12)[:2],
                               rtol=1e-5, atol=1e-5) == 1


FIRST_USE_COMPILED = """
import warnings
import torch
import crl_ops

torch.manual_seed(0)
features, logits = torch.randn(24, 2, 4), torch.randn(24, 2)
labels = torch.tensor([[0, 0]] * 18 + [[1, 1]] * 6)
step = torch.compile(lambda f, z, y: crl_ops.CRL()(f, z, y), backend="aot_eager", fullgraph=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss = step(features, logits, labels)
torch.testing.assert_close(loss, crl_ops.CRL(backend="reference")(features, logits, labels))
print("WARNINGS", [str(w.message) for w in caught if "pure-PyTorch reference" in str(w.message)])
"""


def test_fullgraph_first_use_without_kernels_falls_back():
    """No kernels (CRL_OPS_NATIVE=0) and the first call inside torch.compile(fullgraph=True): one
    graph on the reference, and the warning that says why."""
    env = dict(os.environ, CRL_OPS_NATIVE="0")
    process = subprocess.run([sys.executable, "-c", FIRST_USE_COMPILED], capture_output=True, text=True, env=env,
                             timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "disabled by CRL_OPS_NATIVE=0" in process.stdout, process.stdout
