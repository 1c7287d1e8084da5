"""distributed=True against one process on the concatenated batch, with 2 and 3 gloo ranks on CPU.

Each world size spawns its ranks once (a module fixture). The ranks run every case on their rows
of a shared problem (uneven batch sizes) and save what they got; the tests below compare it with
the single-process result computed here. The expected gradient on each rank's own features and
logits is W times its rows of the single-process gradient (crl_ops/distributed.py explains why),
and DDP's average over the ranks must give exactly the single-process parameter gradients.
"""
import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import crl_ops

from .problems import CPU_BACKENDS, FORMS, MODES, AttributeNet, make_problem

# Uneven per-rank batch sizes; the global batch has minority classes that single ranks barely see.
ROWS_PER_RANK = {2: (9, 5), 3: (6, 9, 4)}
NUM_CLASSES = (2, 3, 4)
INPUT_SIZE = 5


def _balanced_case(mode, form, backend):
    return f"balanced/{mode}/{form}/{backend}"


def _problem(world_size, seed, shared_features=False, logit_format="list", num_classes=NUM_CLASSES):
    batch_size = sum(ROWS_PER_RANK[world_size])
    return make_problem(seed, batch_size, num_classes, 3, shared_features, logit_format, unannotated=0.1, skew=2.0)


def _balanced_problem(world_size, mode, form):
    return _problem(world_size, seed=10 + 3 * MODES.index(mode) + FORMS.index(form))


def _shared_feature_problem(world_size):
    """[B, D] features shared by the attributes and [B, A] binary logits."""
    return _problem(world_size, seed=30, shared_features=True, logit_format="binary", num_classes=(2, 2, 2))


def _rows(world_size, rank):
    sizes = ROWS_PER_RANK[world_size]
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _leaves(problem, rows=slice(None)):
    """(features, logits, labels) of `rows` as fresh float64 leaves in the problem's input format."""
    features, logits, labels, _, _ = problem.inputs(torch.float64)

    def fresh(t):
        return t.detach()[rows].clone().requires_grad_()

    logits = [fresh(lg) for lg in logits] if isinstance(logits, list) else fresh(logits)
    return fresh(features), logits, labels[rows]


def _grad_leaves(features, logits):
    return [features] + (logits if isinstance(logits, list) else [logits])


def _run_loss(loss_fn, problem, rows=slice(None)):
    features, logits, labels = _leaves(problem, rows)
    loss = loss_fn(features, logits, labels)
    leaves = _grad_leaves(features, logits)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]  # CRL alone: none to logits
    return {"loss": loss.detach(), "grads": grads, "stats": loss_fn.last_stats.summary()}


def Heads():
    return AttributeNet(INPUT_SIZE, NUM_CLASSES, dim=3, activation=torch.tanh)


def _ddp_problem(world_size):
    problem = _problem(world_size, seed=50)
    x = torch.randn(problem.labels.shape[0], INPUT_SIZE, generator=torch.Generator().manual_seed(51),
                    dtype=torch.float64)
    return x, problem.labels


def _train_step_grads(model, loss_fn, x, labels):
    features, logits = model(x)
    loss = loss_fn(features, logits, labels)
    loss.backward()
    return {"loss": loss.detach(), "grads": {name: p.grad.clone() for name, p in model.named_parameters()}}


DDP_VARIANTS = (("instance", "relative"), ("class", "distribution"))


def _available_backends():
    return ["reference"] + (["native"] if crl_ops.native_available("cpu") else [])


# ---- what each rank runs ------------------------------------------------------------------------


def _rank_results(world_size, rank):
    rows = _rows(world_size, rank)
    results = {}
    for backend in _available_backends():
        for mode, form in ((m, f) for m in MODES for f in FORMS):
            problem = _balanced_problem(world_size, mode, form)
            loss_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, backend=backend, distributed=True)
            result = _run_loss(loss_fn, problem, rows)
            result["ce"], result["crl"] = loss_fn.last_ce, loss_fn.last_crl
            local = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, backend=backend)
            result["local_loss"] = _run_loss(local, problem, rows)["loss"]
            results[_balanced_case(mode, form, backend)] = result
        for mode in MODES:  # CRL alone, with the other input formats
            problem = _shared_feature_problem(world_size)
            crl = crl_ops.CRL(mode=mode, k=3, backend=backend, distributed=True)
            results[f"crl/shared/{mode}/{backend}"] = _run_loss(crl, problem, rows)

        x, labels = _ddp_problem(world_size)
        for mode, form in DDP_VARIANTS:
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(Heads().double())
            loss_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=3, backend=backend, distributed=True)
            results[f"ddp/{mode}/{form}/{backend}"] = _train_step_grads(model, loss_fn, x[rows], labels[rows])

    results["errors"] = _error_messages(world_size, rank)
    return results


def _error_messages(world_size, rank):
    """The error each rank raises for inputs that are bad on one rank only."""
    features, logits, labels = _leaves(_problem(world_size, seed=40), _rows(world_size, rank))
    crl = crl_ops.CRL(backend="reference", distributed=True)
    wider = torch.cat([features, features[..., :1]], -1)
    with_nan = features.detach().clone()
    with_nan[0, 0, 0] = math.nan
    messages = {}
    for name, bad_features in (("feature size", wider), ("nan", with_nan)):
        on_last_rank = bad_features if rank == world_size - 1 else features
        try:
            crl(on_last_rank, logits, labels)
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _worker(rank, world_size, store, out_dir):
    torch.set_num_threads(1)  # the ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(_rank_results(world_size, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """(world size, [results of each rank])."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    mp.spawn(_worker, args=(world_size, str(out_dir / "store"), str(out_dir)), nprocs=world_size)
    return world_size, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


# ---- the comparisons ----------------------------------------------------------------------------


def _check_against_single_process(world_size, per_rank, single):
    for rank, got in enumerate(per_rank):
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-12, atol=1e-12)
        assert got["stats"] == single["stats"]
        rows = _rows(world_size, rank)
        for grad, full in zip(got["grads"], single["grads"]):
            torch.testing.assert_close(grad, world_size * full[rows], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_balanced_loss_is_the_global_batch_loss(ranks, mode, form, backend):
    world_size, per_rank = ranks
    case = _balanced_case(mode, form, backend)
    single_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, backend=backend)
    single = _run_loss(single_fn, _balanced_problem(world_size, mode, form))
    _check_against_single_process(world_size, [r[case] for r in per_rank], single)
    for result in per_rank:
        torch.testing.assert_close(result[case]["ce"], single_fn.last_ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result[case]["crl"], single_fn.last_crl, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_crl_with_shared_features_and_binary_logits(ranks, mode, backend):
    world_size, per_rank = ranks
    single = _run_loss(crl_ops.CRL(mode=mode, k=3, backend=backend), _shared_feature_problem(world_size))
    assert single["stats"]["triplets"] > 0
    _check_against_single_process(world_size, [r[f"crl/shared/{mode}/{backend}"] for r in per_rank], single)


def test_ranks_alone_would_get_other_losses(ranks):
    # Guards the comparisons above against problems where the global batch changes nothing.
    _, per_rank = ranks
    cases = [_balanced_case(m, f, "reference") for m in MODES for f in FORMS]
    differing = [c for c in cases if any(not torch.equal(r[c]["local_loss"], r[c]["loss"]) for r in per_rank)]
    assert differing == cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode, form", DDP_VARIANTS)
def test_ddp_step_gives_single_process_gradients(ranks, mode, form, backend):
    world_size, per_rank = ranks
    x, labels = _ddp_problem(world_size)
    torch.manual_seed(0)
    model = Heads().double()
    single = _train_step_grads(model, crl_ops.BalancedLoss(mode=mode, form=form, k=3, backend=backend), x, labels)
    for result in (r[f"ddp/{mode}/{form}/{backend}"] for r in per_rank):
        torch.testing.assert_close(result["loss"], single["loss"], rtol=1e-12, atol=1e-12)
        assert result["grads"].keys() == {f"module.{name}" for name in single["grads"]}
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][f"module.{name}"], grad, rtol=1e-10, atol=1e-12)


def test_bad_input_on_one_rank_raises_on_every_rank(ranks):
    world_size, per_rank = ranks
    last = world_size - 1
    for rank, result in enumerate(per_rank):
        messages = result["errors"]
        assert messages["feature size"] is not None and f"rank(s) [{last}] differ from rank 0" in messages["feature size"]
        assert f"rank {rank} has features [*, 3, {4 if rank == last else 3}]" in messages["feature size"]
        assert messages["nan"] is not None and "features contain NaN" in messages["nan"]


def test_distributed_needs_a_process_group():
    assert not dist.is_initialized()
    features, logits, labels = _leaves(_problem(2, seed=40))
    for loss_fn in (crl_ops.CRL(distributed=True), crl_ops.BalancedLoss(distributed=True)):
        with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed process group"):
            loss_fn(features, logits, labels)


def test_distributed_must_be_a_bool():
    with pytest.raises(TypeError, match="distributed must be True or False"):
        crl_ops.CRL(distributed=1)
    with pytest.raises(TypeError, match="distributed must be True or False"):
        crl_ops.BalancedLoss(distributed="yes")
