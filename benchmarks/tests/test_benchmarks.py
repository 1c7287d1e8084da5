"""Sanity checks of benchmarks/: the loop and PML implementations compute CRL, the equality check
catches a wrong implementation, the cost extrapolation refuses what would not fit, and a short run
writes its report. No timing is asserted here."""
import json
import math

import pytest
import torch

import crl_ops
from benchmarks import floor, implementations, report, runner
from benchmarks.__main__ import main
from benchmarks.implementations import IMPLEMENTATIONS, VARIANTS, Variant
from benchmarks.loop_crl import LoopCRL
from benchmarks.plan import Group, build_plan
from benchmarks.problems import LONG_TAIL, Shape, binary_shape, make_inputs

SMALL_SHAPES = [binary_shape(batch_size=48, num_attributes=6, dim=8),
                Shape(LONG_TAIL, 64, (2, 5, 9), 6, k=3)]


def _reference_loss_and_grad(inputs, variant, k):
    loss = crl_ops.CRL(variant.mode, variant.form, k=k, backend="reference")(inputs.features, inputs.logits,
                                                                             inputs.labels)
    (grad,) = torch.autograd.grad(loss, inputs.features)
    return loss, grad


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=["binary", "long-tail"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_loop_implementation_matches_the_reference(shape, variant):
    inputs = make_inputs(shape, "cpu", seed=3)
    expected, expected_grad = _reference_loss_and_grad(inputs, variant, shape.k)
    loss = LoopCRL(variant.mode, variant.form, k=shape.k)(inputs.features, inputs.logits, inputs.labels)
    (grad,) = torch.autograd.grad(loss, inputs.features)
    assert float(expected.detach()) > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_loop_implementation_with_nothing_to_mine_is_a_differentiable_zero():
    shape = binary_shape(batch_size=8, num_attributes=2, dim=4)
    inputs = make_inputs(shape, "cpu")
    labels = torch.zeros_like(inputs.labels)  # one class only: no minority
    for variant in VARIANTS:
        loss = LoopCRL(variant.mode, variant.form)(inputs.features, inputs.logits, labels)
        loss.backward()
        assert float(loss.detach()) == 0.0 and inputs.features.grad.abs().sum() == 0


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=["binary", "long-tail"])
def test_pml_implementation_matches_where_it_is_the_same_function(shape):
    pytest.importorskip("pytorch_metric_learning")
    from benchmarks.pml_crl import PMLCRL

    inputs = make_inputs(shape, "cpu", seed=5)
    for variant in VARIANTS:
        expected, expected_grad = _reference_loss_and_grad(inputs, variant, shape.k)
        loss = PMLCRL(variant.mode, variant.form, k=shape.k)(inputs.features, inputs.logits, inputs.labels)
        (grad,) = torch.autograd.grad(loss, inputs.features)
        if (("pml", variant.form)) in implementations.DIFFERENT_FUNCTION:
            assert math.isfinite(float(loss.detach()))
            continue
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def _settings(**overrides):
    values = dict(device=torch.device("cpu"), budget_seconds=60, max_call_seconds=10, memory_cap_bytes=None,
                  min_seconds=0.0, min_repeats=1, max_repeats=1)
    values.update(overrides)
    return runner.Settings(**values)


def _group(shape, variant, impls):
    return Group(1, shape, variant, tuple(impls), frozenset({"config:test"}))


def test_a_wrong_implementation_is_reported_and_not_timed(monkeypatch):
    make_loss = implementations.make_loss

    def off_by_one_percent(impl, variant, k):
        loss = make_loss(impl, variant, k)
        return (lambda *args: 1.01 * loss(*args)) if impl == "loop" else loss

    monkeypatch.setattr(implementations, "make_loss", off_by_one_percent)
    group = _group(binary_shape(batch_size=32, num_attributes=4, dim=8), Variant("class", "relative"),
                   ["reference", "loop"])
    records = {r["impl"]: r for r in runner.Runner(_settings()).run_group(group)}
    assert records["reference"]["status"] == "ok" and records["reference"]["total"]["n"] == 2  # two rounds
    assert records["loop"]["status"] == "mismatch" and "total" not in records["loop"]
    assert records["loop"]["relative_difference"] == pytest.approx(0.01, rel=1e-3)


def test_a_failing_implementation_is_recorded_and_the_others_still_run(monkeypatch):
    make_loss = implementations.make_loss

    def broken(*args):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(implementations, "make_loss",
                        lambda impl, variant, k: broken if impl == "loop" else make_loss(impl, variant, k))
    group = _group(binary_shape(batch_size=32, num_attributes=4, dim=8), Variant("instance", "absolute"),
                   ["native", "loop"])
    records = {r["impl"]: r for r in runner.Runner(_settings()).run_group(group)}
    assert records["loop"]["status"] == "error" and "broken on purpose" in records["loop"]["reason"]
    assert records["native"]["status"] == "ok"


def test_all_implementations_agree_in_a_group():
    impls = [i for i in implementations.IMPLEMENTATIONS if implementations.unavailable(i, torch.device("cpu")) is None]
    group = _group(Shape(LONG_TAIL, 40, (3, 7), 4, k=2), Variant("instance", "distribution"), impls)
    records = {r["impl"]: r for r in runner.Runner(_settings()).run_group(group)}
    for impl in impls:
        expected = "different-function" if ("pml", "distribution") == (impl, "distribution") else "ok"
        assert records[impl]["status"] == expected, records[impl]
    assert records["reference"]["relative_difference"] == 0.0


def test_cost_model_extrapolates_quadratically_in_the_batch():
    costs = runner.CostModel()
    shape, variant = binary_shape(batch_size=256), Variant("instance", "relative")
    assert costs.predict("native", variant, shape) is None
    costs.add("native", variant, shape, 0.5, 2**20)
    assert costs.predict("native", variant, shape.with_batch(1024)) == (8.0, 16 * 2**20)
    assert costs.predict("native", variant, shape.with_batch(128)) is None  # never extrapolates downwards
    assert costs.predict("native", variant, binary_shape(batch_size=1024, dim=32)) is None  # another family
    costs.add_out_of_memory("native", variant, shape.with_batch(2048))
    assert costs.out_of_memory_at("native", variant, shape.with_batch(4096)) == 2048


def test_a_case_over_the_memory_cap_is_recorded_without_running():
    group = _group(binary_shape(batch_size=2048, num_attributes=2, dim=4), Variant("class", "relative"), ["native"])
    [record] = runner.Runner(_settings(memory_cap_bytes=1)).run_group(group)
    assert record["status"] == "oom-estimate" and "loss" not in record


def test_a_spent_budget_skips_cleanly():
    group = _group(binary_shape(batch_size=32, num_attributes=2, dim=4), Variant("class", "relative"),
                   ["native", "reference"])
    records = runner.Runner(_settings(budget_seconds=0)).run_group(group)
    assert {r["status"] for r in records} == {"budget"}


def test_a_short_run_writes_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["--device", "cpu", "--out", str(tmp_path), "--impl", "native", "reference",
                 "--variants", "class-relative", "--budget-seconds", "5", "--min-seconds", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metadata"]["torch"] == torch.__version__ and results["metadata"]["threads"] >= 1
    assert {r["status"] for r in results["records"]} <= {"ok", "budget", "too-slow"}
    text = (tmp_path / "results.md").read_text()
    assert "| CelebA-like | class-relative |" in text and "## Arithmetic floors" in text
    assert {s["status"] for s in results["training_step"]} <= {"ok", "budget"}
    assert (tmp_path / "speedup.png").stat().st_size > 0
    native = next(r for r in results["records"] if r["impl"] == "native" and r["status"] == "ok")
    assert native["work"]["mining_exps"] > 0 and native["mining"]["median"] > 0
    if results["rates"]["start"] is not None:  # a C compiler was found
        assert 0 < report.floors(native, report.rates(results))["step_fraction"]


def test_the_plans_cover_every_regime():
    quick = build_plan(False, False, list(IMPLEMENTATIONS), list(VARIANTS))
    full = build_plan(True, False, list(IMPLEMENTATIONS), list(VARIANTS))
    for plan in (quick, full):
        swept = lambda p: {g.shape.as_dict()[p] for g in plan if f"sweep:{p}" in g.tags}  # noqa: E731
        assert {5, 16, 32, 64} <= swept("K") and max(swept("C")) == 100_000 and min(swept("B")) == 128
    assert max(g.shape.batch_size for g in full) == 16384
    # The quick run's K and C sweeps time the native kernels alone, but a shared case keeps every implementation.
    shared = next(g for g in quick if {"sweep:B", "sweep:K"} <= g.tags)
    assert shared.impls == tuple(IMPLEMENTATIONS)
    assert all(g.impls == ("native",) for g in quick if g.tags == {"sweep:C"})


def test_floor_work_counts_the_operations_of_a_step():
    shape = binary_shape(batch_size=64, num_attributes=3, dim=8, k=4)
    inputs = make_inputs(shape, "cpu", seed=2)
    for mode in ("instance", "class"):
        crl = crl_ops.CRL(mode, "relative", k=shape.k, backend="reference")
        crl(inputs.features, inputs.logits, inputs.labels)
        counts = crl.last_stats.pair_counts
        work = floor.step_work(shape, mode, crl.last_stats)
        assert work.loss_terms == 3 * int(counts[:, 1:3].sum()) * shape.dim
        if mode == "instance":
            assert work.mining_terms == int(counts[:, 0].sum()) * shape.batch_size * shape.dim > 0
            assert work.mining_exps == 0
        else:
            active = crl.last_stats.active.sum(1)
            assert work.mining_terms == 0
            assert work.mining_exps == int(((2 + active) * (active > 0)).sum()) * shape.batch_size > 0
    rates = floor.Rates(distance_terms=1e9, exps=1e8, read_bytes=1e10, method="test")
    floors = floor.floors(work, rates)
    assert floors["step"] == max(floors["arithmetic"], floors["memory"]) and floors["mining"] > 0


def test_the_plain_loops_are_measured_where_a_compiler_is():
    rates = floor.measure_rates(torch.device("cpu"), seconds=0.2)
    if rates is None:
        pytest.skip("no C compiler")
    assert rates.distance_terms > 1e8 and rates.exps > 1e6 and rates.read_bytes > 1e8
    loop = floor.distance_loop(torch.device("cpu"))
    assert loop.terms > 0 and math.isfinite(loop())
