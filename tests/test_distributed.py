"""distributed=True against one process on the concatenated batch, with 2 and 3 gloo ranks on CPU.

Each world size spawns its ranks once (a module fixture). The ranks run every case on their rows
of a shared problem (uneven batch sizes, or equal ones for batch_sizes="equal") and save what
they got; the tests below compare it, in float64, with the single-process result computed here.
The expected gradient on each rank's own features and logits is W times its rows of the
single-process gradient (crl_ops/distributed.py explains why), a margin tensor gets the
single-process gradient itself, and DDP's average over the ranks must give exactly the
single-process parameter gradients.
"""
import collections
import datetime
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import crl_ops

from .problems import CPU_BACKENDS, FORMS, MODES, AttributeNet, make_problem

# Uneven per-rank batch sizes; the global batch has minority classes that single ranks barely see.
ROWS_PER_RANK = {2: (9, 5), 3: (6, 9, 4)}
EQUAL_ROWS_PER_RANK = {2: (7, 7), 3: (5, 5, 5)}
NUM_CLASSES = (2, 3, 4)
INPUT_SIZE = 5
REDUCTIONS = ("pooled", "attribute")
VARIANTS = [(m, f) for m in MODES for f in FORMS]
# CRL alone with options that change what is gathered or where the gradient goes.
OPTION_CASES = {
    "normalize": dict(mode="instance", form="relative", normalize=True),
    "normalize-histogram": dict(mode="class", form="distribution", normalize=True),
    "score": dict(mode="class", form="relative", distance="score"),
    "score-attribute": dict(mode="class", form="relative", distance="score", reduction="attribute"),
    "margin-tensor": dict(mode="instance", form="relative"),  # with a margin that requires grad
    "score-margin-tensor": dict(mode="class", form="relative", distance="score"),
}


def _balanced_case(mode, form, backend, reduction="pooled"):
    return f"balanced/{mode}/{form}/{reduction}/{backend}"


def _problem(world_size, seed, shared_features=False, logit_format="list", num_classes=NUM_CLASSES,
             rows_per_rank=ROWS_PER_RANK):
    batch_size = sum(rows_per_rank[world_size])
    return make_problem(seed, batch_size, num_classes, 3, shared_features, logit_format, unannotated=0.1, skew=2.0)


def _balanced_problem(world_size, mode, form, rows_per_rank=ROWS_PER_RANK):
    return _problem(world_size, seed=10 + 3 * MODES.index(mode) + FORMS.index(form), rows_per_rank=rows_per_rank)


def _shared_feature_problem(world_size):
    """[B, D] features shared by the attributes and [B, A] binary logits."""
    return _problem(world_size, seed=30, shared_features=True, logit_format="binary", num_classes=(2, 2, 2))


def _rows(world_size, rank, rows_per_rank=ROWS_PER_RANK):
    sizes = rows_per_rank[world_size]
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


def _stats(stats):
    return {name: getattr(stats, name) for name in ("counts", "minority", "active", "pair_counts")}


def _run_loss(loss_fn, problem, rows=slice(None), margin=None):
    features, logits, labels = _leaves(problem, rows)
    loss = loss_fn(features, logits, labels)
    leaves = _grad_leaves(features, logits) + ([margin] if margin is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]  # CRL alone: none to logits
    result = {"loss": loss.detach(), "grads": grads[: len(grads) - (margin is not None)],
              "stats": _stats(loss_fn.last_stats)}
    if margin is not None:
        result["margin_grad"] = grads[-1]
    return result


def _option_margin():
    return torch.tensor([0.4, 0.9, 1.3], dtype=torch.float64, requires_grad=True)


def _option_loss(name, backend, distributed):
    """(CRL for OPTION_CASES[name], its margin tensor or None)."""
    margin = _option_margin() if name.endswith("margin-tensor") else None
    return crl_ops.CRL(k=3, bins=7, margin=margin, backend=backend, distributed=distributed,
                       **OPTION_CASES[name]), margin


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


def _available_backends():
    return ["reference"] + (["native"] if crl_ops.native_available("cpu") else [])


_COLLECTIVE_KINDS = {  # dispatched op -> kind: eager c10d collectives and functional ones
    "_allgather_base_": "all-gather", "all_gather_into_tensor": "all-gather", "allreduce_": "all-reduce",
    "all_reduce": "all-reduce", "_reduce_scatter_base_": "reduce-scatter", "reduce_scatter_tensor": "reduce-scatter",
}


class _OpLog(TorchDispatchMode):
    """The collectives dispatched while active, host reads of tensor values (item, bool), and the
    compute ops: all others but views, the autograd seed and what crl_ops.distributed's collective
    wrappers dispatch inside them (their output buffers, gloo's copies)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.compute = []
        self.in_collective = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in _COLLECTIVE_KINDS:
            self.ops[_COLLECTIVE_KINDS[name]] += 1
        elif "c10d" in str(func) and "wait" not in name and "wrap" not in name:
            self.ops[name] += 1  # any other collective fails the comparison
        elif name == "_local_scalar_dense":
            self.ops["host read"] += 1
        elif not (func.is_view or self.in_collective or name == "ones_like"):
            self.compute.append(name)
        return func(*args, **(kwargs or {}))

    def wrap(self, collective):
        def inside(*args, **kwargs):
            self.in_collective += 1
            try:
                return collective(*args, **kwargs)
            finally:
                self.in_collective -= 1

        return inside


def _ops_of_one_step(loss_fn, problem, rows, monkeypatch_tolist):
    """Collectives, host reads and compute ops of a step's forward and backward, after a first step."""
    from crl_ops import distributed

    features, logits, labels = _leaves(problem, rows)
    loss_fn(features, logits, labels).backward()
    features.grad = None  # no accumulation into an earlier gradient
    log = _OpLog()
    wrappers = {name: getattr(distributed, name) for name in ("_all_gather", "_reduce_scatter", "_all_reduce")}
    for name, collective in wrappers.items():
        setattr(distributed, name, log.wrap(collective))
    try:
        with log, monkeypatch_tolist(log.ops):
            loss_fn(features, logits, labels).backward()
    finally:
        for name, collective in wrappers.items():
            setattr(distributed, name, collective)
    return {**log.ops, "compute": log.compute}


class _CountingTolist:
    """Counts Tensor.tolist calls (they read values on the host without dispatching an op)."""

    def __init__(self, counter):
        self.counter = counter

    def __enter__(self):
        self.original = torch.Tensor.tolist
        counter, original = self.counter, self.original

        def tolist(tensor):
            counter["host read"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.original


def _compiled_steps(world_size, rank, backend, mode, k):
    """A model and BalancedLoss (batch_sizes="equal") compiled with aot_eager against eager: losses,
    gradients and where dynamo breaks the graph."""
    rows = _rows(world_size, rank, EQUAL_ROWS_PER_RANK)
    x, _ = _ddp_problem(world_size)
    batches = [(x[: sum(EQUAL_ROWS_PER_RANK[world_size])][rows],
                _balanced_problem(world_size, mode, form, EQUAL_ROWS_PER_RANK).labels[rows])
               for form in ("relative", "absolute")]

    def step(model, loss_fn, inputs, labels):
        features, logits = model(inputs)
        return loss_fn(features, logits, labels)

    def train(compiled):
        torch.manual_seed(0)
        model = Heads().double()
        loss_fn = crl_ops.BalancedLoss(mode=mode, k=k, backend=backend, distributed=True, batch_sizes="equal")
        run = torch.compile(step, backend="aot_eager") if compiled else step
        out = []
        for inputs, labels in batches:
            model.zero_grad()
            loss = run(model, loss_fn, inputs, labels)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        return out, model, loss_fn

    torch._dynamo.reset()
    eager, model, loss_fn = train(compiled=False)
    compiled, _, _ = train(compiled=True)
    explanation = torch._dynamo.explain(step)(model, loss_fn, *batches[0])
    torch._dynamo.reset()
    return {"eager": eager, "compiled": compiled, "graphs": explanation.graph_count,
            "breaks": [(reason.reason.splitlines()[0], reason.user_stack[-1].name, reason.user_stack[-1].line)
                       for reason in explanation.break_reasons]}


# ---- what each rank runs ------------------------------------------------------------------------


def _rank_results(world_size, rank):
    rows = _rows(world_size, rank)
    equal_rows = _rows(world_size, rank, EQUAL_ROWS_PER_RANK)
    results = {}
    for backend in _available_backends():
        for mode, form in VARIANTS:
            problem = _balanced_problem(world_size, mode, form)
            for reduction in REDUCTIONS:
                loss_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, reduction=reduction,
                                               backend=backend, distributed=True)
                result = _run_loss(loss_fn, problem, rows)
                result["ce"], result["crl"] = loss_fn.last_ce, loss_fn.last_crl
                local = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, reduction=reduction, backend=backend)
                result["local_loss"] = _run_loss(local, problem, rows)["loss"]
                results[_balanced_case(mode, form, backend, reduction)] = result
            equal = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, backend=backend,
                                                                distributed=True, batch_sizes="equal")
            results[f"equal/{mode}/{form}/{backend}"] = _run_loss(
                equal, _balanced_problem(world_size, mode, form, EQUAL_ROWS_PER_RANK), equal_rows)
        for form in FORMS:  # class mode with k=1: the partner table is smaller than the gathered vectors
            partner = crl_ops.BalancedLoss(mode="class", form=form, k=1, bins=7, backend=backend, distributed=True)
            results[f"partner rows/{form}/{backend}"] = _run_loss(partner, _balanced_problem(world_size, "class", form),
                                                                  rows)
            shared = crl_ops.CRL(mode="class", form=form, k=1, bins=7, backend=backend, distributed=True)
            results[f"partner rows/shared/{form}/{backend}"] = _run_loss(shared, _shared_feature_problem(world_size),
                                                                         rows)
            equal = crl_ops.CRL(mode="class", form=form, k=1, bins=7, backend=backend, distributed=True,
                                batch_sizes="equal")
            results[f"partner rows/equal/{form}/{backend}"] = _run_loss(
                equal, _balanced_problem(world_size, "class", form, EQUAL_ROWS_PER_RANK), equal_rows)
        for mode in MODES:  # CRL alone, with the other input formats
            problem = _shared_feature_problem(world_size)
            crl = crl_ops.CRL(mode=mode, k=3, backend=backend, distributed=True)
            results[f"crl/shared/{mode}/{backend}"] = _run_loss(crl, problem, rows)
        for name in OPTION_CASES:
            crl, margin = _option_loss(name, backend, distributed=True)
            results[f"options/{name}/{backend}"] = _run_loss(crl, _balanced_problem(world_size, "class", "absolute"),
                                                             rows, margin)

        x, labels = _ddp_problem(world_size)
        for mode, form in VARIANTS:
            for k in (3, 1) if mode == "class" else (3,):  # class mode k=1: partner rows
                torch.manual_seed(0)
                model = nn.parallel.DistributedDataParallel(Heads().double())
                loss_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=k, backend=backend, distributed=True)
                results[f"ddp/{mode}/{form}/{k}/{backend}"] = _train_step_grads(model, loss_fn, x[rows], labels[rows])

    backend = _available_backends()[-1]
    for mode, form in VARIANTS:  # logits [B, A, C]: no list to stack
        problem = _problem(world_size, seed=20, logit_format="tensor3d", num_classes=(3, 3, 3),
                           rows_per_rank=EQUAL_ROWS_PER_RANK)
        for batch_sizes in ("gathered", "equal"):  # class mode with k=1: partner rows
            loss_fn = crl_ops.CRL(mode=mode, form=form, k=3 if mode == "instance" else 1, backend=backend,
                                  distributed=True, batch_sizes=batch_sizes)
            results[f"ops/{batch_sizes}/{mode}-{form}"] = _ops_of_one_step(loss_fn, problem, equal_rows,
                                                                           _CountingTolist)
    for mode in MODES:
        for k in (3, 1) if mode == "class" else (3,):  # class mode k=1: partner rows
            results[f"compiled/{mode}/{k}"] = _compiled_steps(world_size, rank, backend, mode, k)
    results["errors"] = _error_messages(world_size, rank)
    return results


# CRL options that differ on the last rank only: every rank must raise, naming it.
DISAGREEING_OPTIONS = {"reduction": dict(reduction="attribute"), "threshold": dict(threshold=0.4),
                       "margin": dict(margin=0.5), "apc_margin": dict(apc_margin=2.0), "k": dict(k=4),
                       "batch_sizes": dict(batch_sizes="equal"), "validate": dict(validate=False)}


def _error_messages(world_size, rank):
    """What each rank raises (or returns) for inputs that are bad, or disagree, on one rank only:
    {backend: {case: message or None}}."""
    last = rank == world_size - 1
    rows = _rows(world_size, rank)
    features, logits, labels = _leaves(_problem(world_size, seed=40), rows)
    wider = torch.cat([features, features[..., :1]], -1)
    with_nan = features.detach().clone()
    with_nan[0, 0, 0] = math.nan
    with_nan.requires_grad_()  # as the other ranks' features: the same collectives in the backward
    nan_logits = [lg.detach().clone() for lg in logits]
    nan_logits[1][0, 0] = math.inf
    bad_label = labels.clone()
    bad_label[1, 2] = NUM_CLASSES[2]
    shared_features, binary_logits, binary_labels = _leaves(_shared_feature_problem(world_size), rows)
    two_column = torch.stack([torch.zeros_like(binary_logits), binary_logits], -1).detach()
    equal_problem = _problem(world_size, seed=40, rows_per_rank=EQUAL_ROWS_PER_RANK)
    equal_features, equal_logits, equal_labels = _leaves(equal_problem, _rows(world_size, rank, EQUAL_ROWS_PER_RANK))

    def raised(crl, *inputs):
        try:
            crl(*inputs)
        except ValueError as error:
            return str(error)
        return None

    messages = {}
    for backend in _available_backends():
        def crl(**options):
            return crl_ops.CRL(backend=backend, distributed=True, **options)

        got = {
            "feature size": raised(crl(), wider if last else features, logits, labels),
            "nan": raised(crl(), with_nan if last else features, logits, labels),
            "nan logits": raised(crl(), features, nan_logits if last else logits, labels),
            "label": raised(crl(), features, logits, bad_label if last else labels),
            "class nan": raised(crl(mode="class", k=1), with_nan if last else features, logits, labels),
            "equal/feature size": raised(crl(batch_sizes="equal"), wider if last else features, logits, labels),
            "equal/uneven sizes": raised(crl(batch_sizes="equal"), features, logits, labels),
            "logits format": raised(crl(), shared_features, two_column if last else binary_logits, binary_labels),
            "all empty": raised(crl(), features[:0], [lg[:0] for lg in logits], labels[:0]),
        }
        for name, options in DISAGREEING_OPTIONS.items():
            got[f"option {name}"] = raised(crl(**(options if last else {})), features, logits, labels)
        # What decides which collectives run: the caller, and which tensors take a gradient.
        balanced = crl_ops.BalancedLoss(backend=backend, distributed=True, weight=0.5 if last else 1.0)
        got["balanced weight"] = raised(balanced, features, logits, labels)
        got["detached features"] = raised(crl(), features.detach() if last else features, logits, labels)
        margin = torch.full((3,), 0.5, dtype=torch.float64, requires_grad=last)
        got["margin requires grad"] = raised(crl(margin=margin), features, logits, labels)
        unchecked = crl(validate=False)
        nan_features = with_nan if last else features
        loss = unchecked(nan_features, logits, labels)
        (grad,) = torch.autograd.grad(loss, nan_features)
        got["unchecked nan"] = {"loss": loss.detach(), "grad": grad}
        # An empty batch on the last rank: the others' rows are the global batch.
        empty = crl_ops.CRL(backend=backend, distributed=True, k=3)
        got["empty rank"] = _run_loss(empty, _problem(world_size, seed=40), slice(rows.start, rows.start) if last
                                      else rows)
        # After the errors, the ranks still agree: a good equal-size step works.
        got["after errors"] = crl(batch_sizes="equal")(equal_features, equal_logits, equal_labels).detach()
        messages[backend] = got
    return messages


def _worker(rank, world_size, store, out_dir):
    torch.set_num_threads(1)  # the ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(_rank_results(world_size, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# A world's whole run, bounded: a rank left waiting in a collective fails the tests instead of hanging
# them (gloo's own timeout, 120 s per collective, raises inside the ranks first).
RUN_TIMEOUT_SECONDS = 1200


def _spawn_bounded(worker, args, world_size, timeout):
    context = mp.start_processes(worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} ranks did not finish within {timeout} s: a rank hangs")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """(world size, [results of each rank])."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    _spawn_bounded(_worker, (world_size, str(out_dir / "store"), str(out_dir)), world_size, RUN_TIMEOUT_SECONDS)
    return world_size, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


# ---- the comparisons ----------------------------------------------------------------------------


def _check_against_single_process(world_size, per_rank, single, rows_per_rank=ROWS_PER_RANK):
    for rank, got in enumerate(per_rank):
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-12, atol=1e-12)
        for name, value in single["stats"].items():
            assert torch.equal(got["stats"][name], value), name
        rows = _rows(world_size, rank, rows_per_rank)
        for grad, full in zip(got["grads"], single["grads"], strict=True):
            torch.testing.assert_close(grad, world_size * full[rows], rtol=1e-10, atol=1e-12)
        if "margin_grad" in single:  # replicated: the single-process gradient itself, on every rank
            torch.testing.assert_close(got["margin_grad"], single["margin_grad"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_balanced_loss_is_the_global_batch_loss(ranks, mode, form, backend, reduction):
    world_size, per_rank = ranks
    case = _balanced_case(mode, form, backend, reduction)
    single_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, reduction=reduction, backend=backend)
    single = _run_loss(single_fn, _balanced_problem(world_size, mode, form))
    assert single["stats"]["pair_counts"][:, 3].sum() > 0
    _check_against_single_process(world_size, [r[case] for r in per_rank], single)
    for result in per_rank:
        torch.testing.assert_close(result[case]["ce"], single_fn.last_ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result[case]["crl"], single_fn.last_crl, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_declared_equal_batches_give_the_global_batch_loss(ranks, mode, form, backend):
    world_size, per_rank = ranks
    single_fn = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=7, backend=backend)
    single = _run_loss(single_fn, _balanced_problem(world_size, mode, form, EQUAL_ROWS_PER_RANK))
    _check_against_single_process(world_size, [r[f"equal/{mode}/{form}/{backend}"] for r in per_rank], single,
                                  EQUAL_ROWS_PER_RANK)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_class_mode_exchanging_partner_rows_gives_the_global_batch_loss(ranks, form, backend):
    world_size, per_rank = ranks
    balanced = crl_ops.BalancedLoss(mode="class", form=form, k=1, bins=7, backend=backend)
    single = _run_loss(balanced, _balanced_problem(world_size, "class", form))
    assert single["stats"]["pair_counts"][:, 3].sum() > 0
    _check_against_single_process(world_size, [r[f"partner rows/{form}/{backend}"] for r in per_rank], single)
    single = _run_loss(crl_ops.CRL(mode="class", form=form, k=1, bins=7, backend=backend),
                       _shared_feature_problem(world_size))
    _check_against_single_process(world_size, [r[f"partner rows/shared/{form}/{backend}"] for r in per_rank], single)
    single = _run_loss(crl_ops.CRL(mode="class", form=form, k=1, bins=7, backend=backend),
                       _balanced_problem(world_size, "class", form, EQUAL_ROWS_PER_RANK))
    _check_against_single_process(world_size, [r[f"partner rows/equal/{form}/{backend}"] for r in per_rank], single,
                                  EQUAL_ROWS_PER_RANK)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_crl_with_shared_features_and_binary_logits(ranks, mode, backend):
    world_size, per_rank = ranks
    single = _run_loss(crl_ops.CRL(mode=mode, k=3, backend=backend), _shared_feature_problem(world_size))
    assert single["stats"]["pair_counts"][:, 3].sum() > 0
    _check_against_single_process(world_size, [r[f"crl/shared/{mode}/{backend}"] for r in per_rank], single)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", OPTION_CASES)
def test_normalised_features_class_scores_and_margin_tensors(ranks, name, backend):
    world_size, per_rank = ranks
    crl, margin = _option_loss(name, backend, distributed=False)
    single = _run_loss(crl, _balanced_problem(world_size, "class", "absolute"), margin=margin)
    if OPTION_CASES[name].get("distance") == "score":  # CRL's gradient reaches the logits
        assert any(g.abs().sum() > 0 for g in single["grads"][1:])
    _check_against_single_process(world_size, [r[f"options/{name}/{backend}"] for r in per_rank], single)


def test_ranks_alone_would_get_other_losses(ranks):
    # Guards the comparisons above against problems where the global batch changes nothing.
    _, per_rank = ranks
    cases = [_balanced_case(m, f, "reference", reduction) for m, f in VARIANTS for reduction in REDUCTIONS]
    differing = [c for c in cases if any(not torch.equal(r[c]["local_loss"], r[c]["loss"]) for r in per_rank)]
    assert differing == cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode, k", [("instance", 3), ("class", 3), ("class", 1)])  # class k=1: partner rows
def test_ddp_step_gives_single_process_gradients(ranks, mode, k, form, backend):
    world_size, per_rank = ranks
    x, labels = _ddp_problem(world_size)
    torch.manual_seed(0)
    model = Heads().double()
    single = _train_step_grads(model, crl_ops.BalancedLoss(mode=mode, form=form, k=k, backend=backend), x, labels)
    for result in (r[f"ddp/{mode}/{form}/{k}/{backend}"] for r in per_rank):
        torch.testing.assert_close(result["loss"], single["loss"], rtol=1e-12, atol=1e-12)
        assert result["grads"].keys() == {f"module.{name}" for name in single["grads"]}
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][f"module.{name}"], grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_a_step_with_equal_batches_declared_has_no_host_synchronisation(ranks, mode, form):
    _, per_rank = ranks
    # The default validate=True. Forward: CRL vectors, labels and logits in one all-gather; the
    # sums, pair counts and value flags (and the histogram form's R) all-reduced. Backward: one
    # reduce-scatter of the vectors' gradient. The value checks read nothing on the host.
    # Class mode (partner rows, k=1 here): labels and logits in the all-gather, the partner table
    # all-reduced in the forward and its gradient in the backward, no reduce-scatter.
    equal = {"all-gather": 1, "all-reduce": 2 if form == "distribution" else 1, "reduce-scatter": 1}
    if mode == "class":
        equal = {"all-gather": 1, "all-reduce": equal["all-reduce"] + 2}
    gathered = {**equal, "all-gather": 2, "host read": 1}  # + the batch sizes, read on the host
    for result in per_rank:
        assert {k: v for k, v in result[f"ops/equal/{mode}-{form}"].items() if k != "compute"} == equal
        assert {k: v for k, v in result[f"ops/gathered/{mode}-{form}"].items() if k != "compute"} == gathered


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_a_step_is_a_few_fused_ops(ranks, mode, form):
    _, per_rank = ranks
    if "native" not in _available_backends():
        pytest.skip("the native kernels are not built")
    # The packing of the gathered rows, the forward ops (and the histogram form's longest distance),
    # shard_loss, their backward ops and (instance mode) the gradient's scale: at most 10.
    if mode == "instance":
        forward = ["cat", "shard_mine", "pair_distances"] + (["amax"] if form == "distribution" else [])
        backward = ["pair_distances_backward", "mul"]
    else:  # partner rows (k=1 here), the table's all-reduce among the collectives
        forward = ["cat", "shard_mine", "shard_table", "table_distances"]
        backward = ["table_distances_backward", "shard_table_backward"]
    forward += ["shard_sums", "shard_loss"]
    backward = ["shard_loss_backward", "shard_sums_backward"] + backward
    for result in per_rank:
        assert result[f"ops/equal/{mode}-{form}"]["compute"] == forward + backward
        assert len(forward + backward) <= 10


@pytest.mark.parametrize("mode, k", [("instance", 3), ("class", 3), ("class", 1)])  # class k=1: partner rows
def test_compiled_step_breaks_the_graph_only_at_the_batch_sizes(ranks, mode, k):
    _, per_rank = ranks
    for result in (r[f"compiled/{mode}/{k}"] for r in per_rank):
        # One place: the host-side batch sizes. Dynamo splits each enclosing frame there (the step,
        # BalancedLoss.forward, the distributed loss): the model, the input normalisation, the
        # rest of CRL with its collectives, and the cross-entropy each trace into one graph.
        assert result["breaks"] and all(
            "torch.compiler.disable()" in reason and function == "class_rectification_loss" and "_rank_sizes(" in line
            for reason, function, line in result["breaks"]), result["breaks"]
        assert result["graphs"] == 4
        for (eager_loss, eager_grads), (loss, grads) in zip(result["eager"], result["compiled"], strict=True):
            torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=1e-12)
            for grad, eager_grad in zip(grads, eager_grads, strict=True):
                torch.testing.assert_close(grad, eager_grad, rtol=1e-10, atol=1e-12)


def _single_process_error(problem, change):
    features, logits, labels = _leaves(problem)
    features, logits, labels = change(features.detach().clone(), [lg.detach().clone() for lg in logits], labels.clone())
    with pytest.raises(ValueError) as error:
        crl_ops.CRL(backend="reference")(features, logits, labels)
    return str(error.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input_on_one_rank_raises_on_every_rank(ranks, backend):
    world_size, per_rank = ranks
    if backend not in _available_backends():
        pytest.skip("the native kernels are not built")
    last = world_size - 1
    problem, first_of_last = _problem(world_size, seed=40), _rows(world_size, last).start

    def bad_label(features, logits, labels):
        labels[first_of_last + 1, 2] = NUM_CLASSES[2]
        return features, logits, labels

    def inf_logit(features, logits, labels):
        logits[1][first_of_last, 0] = math.inf
        return features, logits, labels

    def nan_feature(features, logits, labels):
        features[first_of_last, 0, 0] = math.nan
        return features, logits, labels

    sizes = list(ROWS_PER_RANK[world_size])
    for rank, result in enumerate(per_rank):
        messages = result["errors"][backend]
        for name in ("feature size", "equal/feature size"):
            assert f"rank(s) [{last}] differ from rank 0" in messages[name]
            assert f"rank {rank} has CRL: features [*, 3, {4 if rank == last else 3}]" in messages[name]
        for name in ["logits format", "balanced weight", "detached features", "margin requires grad"] + [
                f"option {option}" for option in DISAGREEING_OPTIONS]:
            assert messages[name] is not None and f"rank(s) [{last}] differ from rank 0" in messages[name], name
        # The single process's messages: the label's row in the concatenated batch, logits before features.
        assert messages["label"] == _single_process_error(problem, bad_label)
        assert messages["nan logits"] == _single_process_error(problem, inf_logit)
        assert messages["nan"] == _single_process_error(problem, nan_feature)
        assert messages["class nan"] == messages["nan"]
        assert messages["equal/uneven sizes"] == (f"batch_sizes='equal' but the ranks' batch sizes are {sizes}; pass "
                                                  "batch_sizes='gathered' where they may differ")
        assert messages["all empty"] == ("distributed=True: every rank's labels are empty; the global batch must "
                                         "hold at least one sample")
        assert torch.isnan(messages["unchecked nan"]["loss"])  # validate=False: NaN on every rank
        assert torch.isnan(messages["unchecked nan"]["grad"]).all()
        assert torch.isfinite(messages["after errors"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_empty_batch_on_one_rank_contributes_nothing(ranks, backend):
    world_size, per_rank = ranks
    if backend not in _available_backends():
        pytest.skip("the native kernels are not built")
    last_rows = _rows(world_size, world_size - 1)
    rest = slice(0, last_rows.start)  # the global batch without the last rank's rows
    single = _run_loss(crl_ops.CRL(backend=backend, k=3), _problem(world_size, seed=40), rest)
    assert single["stats"]["pair_counts"][:, 3].sum() > 0
    for rank, result in enumerate(per_rank):
        got = result["errors"][backend]["empty rank"]
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-12, atol=1e-12)
        for name, value in single["stats"].items():
            assert torch.equal(got["stats"][name], value), name
        rows = _rows(world_size, rank) if rank < world_size - 1 else slice(last_rows.start, last_rows.start)
        for grad, full in zip(got["grads"], single["grads"], strict=True):
            torch.testing.assert_close(grad, world_size * full[rows] if rank < world_size - 1 else full[:0],
                                       rtol=1e-10, atol=1e-12)


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
