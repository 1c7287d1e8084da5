"""Runs the plan: value checks, peak memory and interleaved timing rounds, within a time budget.

Each group (one shape and variant) is measured in four passes over its implementations: a first
call (warm-up, and the loss value, checked against the reference's), one call for the peak
memory, then two timing rounds. The second round repeats the first, so the difference between
the two shows the noise of the machine. In each round the native kernels' mining alone
(`crl_ops.mine`) is timed too, and the native step's operation counts (from its BatchStats) are
recorded for the case's arithmetic floors (benchmarks/floor.py).

Cost is extrapolated from smaller batches of the same shape family (quadratically in B, an
upper bound for every implementation here): on the CPU a case whose estimated peak memory is
over the cap is recorded as out of memory without running it; any case whose estimated call is
over `max_call_seconds`, or which would not fit in the time left, is skipped and recorded.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

import crl_ops

from . import floor
from . import implementations as impls_
from .implementations import Variant
from .plan import Group
from .problems import CONFIGS, DeepID2Sized, Shape, make_inputs
from .timing import Clock, Samples, measure_memory, run_step, summary, time_call, time_step

SAFE_BATCH = 512  # at or below this batch size every implementation fits and runs in seconds
TRAINING_BATCH = 128


@dataclass
class Settings:
    device: torch.device
    budget_seconds: float
    max_call_seconds: float  # skip a case whose single forward + backward is estimated longer
    memory_cap_bytes: Optional[int]  # CPU: skip a case whose estimated peak memory is larger
    min_seconds: float  # per implementation and timing round
    min_repeats: int = 3
    max_repeats: int = 200
    seed: int = 0


class CaseFailed(Exception):
    """A call of one implementation failed: status "oom" (out of memory) or "error" (anything else,
    recorded so that one failing case does not end a run that a GPU loan allows only once)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _is_out_of_memory(error: RuntimeError) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class CostModel:
    """Measured seconds per call and peak bytes per (implementation, variant, shape without B)."""

    def __init__(self):
        self._points: Dict[tuple, Dict[int, Tuple[float, Optional[int]]]] = {}
        self._out_of_memory: Dict[tuple, int] = {}

    @staticmethod
    def _family(impl: str, variant: Variant, shape: Shape) -> tuple:
        return impl, variant, replace(shape, batch_size=0)

    def add(self, impl, variant, shape, seconds: float, peak_bytes: Optional[int]) -> None:
        self._points.setdefault(self._family(impl, variant, shape), {})[shape.batch_size] = (seconds, peak_bytes)

    def add_out_of_memory(self, impl, variant, shape) -> None:
        family = self._family(impl, variant, shape)
        self._out_of_memory[family] = min(shape.batch_size, self._out_of_memory.get(family, shape.batch_size))

    def out_of_memory_at(self, impl, variant, shape) -> Optional[int]:
        smallest = self._out_of_memory.get(self._family(impl, variant, shape))
        return smallest if smallest is not None and smallest <= shape.batch_size else None

    def nearest_below(self, impl, variant, shape) -> Optional[int]:
        sizes = [b for b in self._points.get(self._family(impl, variant, shape), {}) if b <= shape.batch_size]
        return max(sizes) if sizes else None

    def predict(self, impl, variant, shape) -> Optional[Tuple[float, Optional[int]]]:
        below = self.nearest_below(impl, variant, shape)
        if below is None:
            return None
        seconds, peak = self._points[self._family(impl, variant, shape)][below]
        growth = (shape.batch_size / below) ** 2
        return seconds * growth, None if peak is None else int(peak * growth)


class Runner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = settings.device
        self.clock = Clock(settings.device)
        self.costs = CostModel()
        self.deadline = time.perf_counter() + settings.budget_seconds
        self.distance_loop = floor.distance_loop(settings.device)  # after floor.measure_rates, if at all

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    # ---- guards ---------------------------------------------------------------------------------

    def _call(self, fn: Callable):
        """fn(), with a failure turned into CaseFailed (and memory released)."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - recorded with the case, see CaseFailed
            oom = isinstance(error, RuntimeError) and _is_out_of_memory(error)
            status = "oom" if oom else "error"
            message = (str(error).splitlines() or [""])[0][:200]
            message = message if oom else f"{type(error).__name__}: {message}"
        _release(self.device)
        raise CaseFailed(status, message)

    def _failed(self, impl: str, variant: Variant, shape: Shape, record: dict, failure: CaseFailed) -> None:
        if failure.status == "oom":
            self.costs.add_out_of_memory(impl, variant, shape)
        record.update(status=failure.status, reason=str(failure))

    def _refusal(self, impl: str, variant: Variant, shape: Shape) -> Optional[Tuple[str, str]]:
        """(status, reason) when a case should not be run, from what smaller batches cost."""
        failed_at = self.costs.out_of_memory_at(impl, variant, shape)
        if failed_at is not None:
            return "oom", f"out of memory already at B={failed_at}"
        if shape.batch_size > SAFE_BATCH:
            self._probe_smaller(impl, variant, shape)
        predicted = self.costs.predict(impl, variant, shape)
        if self.seconds_left() <= 0:
            return "budget", "time budget spent"
        if predicted is None:
            return None
        seconds, peak = predicted
        cap = self.settings.memory_cap_bytes
        if self.device.type == "cpu" and cap is not None and peak is not None and peak > cap:
            return "oom-estimate", f"estimated peak {peak / 2**30:.1f} GiB > cap {cap / 2**30:.1f} GiB"
        if seconds > self.settings.max_call_seconds:
            return "too-slow", f"estimated {seconds:.1f} s per call > limit {self.settings.max_call_seconds:g} s"
        if 4 * seconds > self.seconds_left():
            return "budget", f"estimated {4 * seconds:.1f} s needed, {self.seconds_left():.0f} s left"
        return None

    def _probe_smaller(self, impl: str, variant: Variant, shape: Shape) -> None:
        """Makes sure a batch at least a quarter of this one has been measured, measuring one if not."""
        below = self.costs.nearest_below(impl, variant, shape)
        if below is not None and 4 * below >= shape.batch_size:
            return
        smaller = shape.with_batch(shape.batch_size // 4)
        if self._refusal(impl, variant, smaller) is not None:
            return
        inputs = make_inputs(smaller, self.device, self.settings.seed)
        loss = impls_.make_loss(impl, variant, smaller.k)
        step = lambda: loss(inputs.features, inputs.logits, inputs.labels)  # noqa: E731
        try:
            self._call(lambda: run_step(step, [inputs.features]))  # warm-up, so as not to time one-off setup
            peak, seconds = self._call(lambda: measure_memory(step, [inputs.features], self.device))
            self.costs.add(impl, variant, smaller, seconds, peak)
        except CaseFailed as failure:
            if failure.status == "oom":
                self.costs.add_out_of_memory(impl, variant, smaller)

    # ---- one group -------------------------------------------------------------------------------

    def run_group(self, group: Group) -> List[dict]:
        shape, variant = group.shape, group.variant
        records = {impl: _record(group, impl) for impl in group.impls}
        runnable = []
        for impl in group.impls:
            why_not = impls_.unavailable(impl, self.device)
            refusal = ("unavailable", why_not) if why_not else self._refusal(impl, variant, shape)
            different = impls_.DIFFERENT_FUNCTION.get((impl, variant.form))
            if different and not any(t.startswith("config:") for t in group.tags):
                refusal = refusal or ("different-function", different)  # its value is checked on the configs only
            if refusal:
                records[impl].update(status=refusal[0], reason=refusal[1])
            else:
                runnable.append(impl)
        if runnable:
            self._measure(group, runnable, records)
        return list(records.values())

    def _measure(self, group: Group, runnable: List[str], records: Dict[str, dict]) -> None:
        shape, variant = group.shape, group.variant
        inputs = make_inputs(shape, self.device, self.settings.seed)
        leaves = [inputs.features]
        steps, losses = {}, {}
        for impl in runnable:
            loss = losses[impl] = impls_.make_loss(impl, variant, shape.k)
            steps[impl] = lambda loss=loss: loss(inputs.features, inputs.logits, inputs.labels)
        mine = lambda: crl_ops.mine(inputs.features.detach(), inputs.logits, inputs.labels, variant.mode,  # noqa: E731
                                    shape.k, backend="native")

        # Pass 1: warm-up, and the loss value of every implementation.
        values = {}
        for impl in runnable:
            try:
                values[impl] = float(self._call(lambda: run_step(steps[impl], leaves)))
            except CaseFailed as failure:
                self._failed(impl, variant, shape, records[impl], failure)
        baseline = next((i for i in ("reference", "native", *runnable) if i in values), None)
        agreeing = []
        for impl, value in values.items():
            relative = abs(value - values[baseline]) / max(abs(values[baseline]), 1e-30)
            records[impl].update(loss=value, baseline=baseline, relative_difference=relative)
            different = impls_.DIFFERENT_FUNCTION.get((impl, variant.form))
            if different:
                records[impl].update(status="different-function", reason=different)
            elif not impls_.values_agree(value, values[baseline]):
                records[impl].update(status="mismatch", reason=f"loss {value:.7g} vs {baseline} {values[baseline]:.7g}")
            else:
                agreeing.append(impl)
        if "native" in values:
            work = floor.step_work(shape, variant.mode, losses["native"].last_stats)
            records["native"]["work"] = vars(work)

        # Pass 2: peak memory (one more call, also the per-call cost estimate for larger batches).
        timed = []
        for impl in agreeing:
            try:
                peak, seconds = self._call(lambda: measure_memory(steps[impl], leaves, self.device))
            except CaseFailed as failure:
                self._failed(impl, variant, shape, records[impl], failure)
                continue
            self.costs.add(impl, variant, shape, seconds, peak)
            records[impl].update(peak_memory_bytes=peak, call_seconds=seconds)
            timed.append(impl)

        # Passes 3 and 4: two interleaved timing rounds (and the native mining right after the native step).
        samples = {impl: [] for impl in timed}
        mining, loop_rates = [], []
        for _ in range(2):
            for impl in timed:
                call = records[impl]["call_seconds"]
                repeats = self.settings.min_repeats if call < 1.0 else 1
                if max(self.settings.min_seconds, repeats * call) > self.seconds_left():
                    continue
                try:
                    samples[impl].append(self._call(lambda: time_step(
                        steps[impl], leaves, self.clock, self.settings.min_seconds, repeats,
                        self.settings.max_repeats)))
                    if impl == "native":
                        mining.append(self._call(lambda: time_call(mine, self.clock, self.settings.min_seconds,
                                                                   repeats, self.settings.max_repeats)))
                        if self.distance_loop is not None:
                            loop = time_call(self.distance_loop, self.clock, self.settings.min_seconds / 2,
                                             self.settings.min_repeats, self.settings.max_repeats)
                            loop_rates.append(self.distance_loop.terms / summary(loop)["median"])
                except CaseFailed as failure:
                    self._failed(impl, variant, shape, records[impl], failure)
        for impl in timed:
            if records[impl]["status"] in ("oom", "error"):
                continue
            if not samples[impl]:
                records[impl].update(status="budget", reason="time budget spent before timing")
                continue
            records[impl].update(status="ok", **_timing_fields(samples[impl]))
            if impl == "native" and mining:
                records[impl]["mining"] = summary([s for r in mining for s in r])
                records[impl]["mining_round_medians"] = [summary(r)["median"] for r in mining]
            if impl == "native" and loop_rates:
                records[impl]["distance_terms_rate"] = summary(loop_rates)["median"]
        del steps, losses, inputs
        _release(self.device)

    # ---- training step ---------------------------------------------------------------------------

    def run_training_steps(self, objectives: List[Tuple[str, Optional[Variant]]]) -> List[dict]:
        """Step time of a DeepID2-sized network at batch 128 (forward, loss, backward, SGD update)
        for each objective: ("ce", None) for the cross-entropy alone, (backend, variant) for CE + CRL."""
        if self.seconds_left() <= 0:
            return [_training_record(o, "budget", "time budget spent") for o in objectives]
        torch.manual_seed(self.settings.seed)
        model = DeepID2Sized().to(self.device)
        optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        inputs = make_inputs(CONFIGS["celeba"].with_batch(TRAINING_BATCH), self.device, self.settings.seed)
        generator = torch.Generator().manual_seed(self.settings.seed)
        images = torch.randn(TRAINING_BATCH, *model.input_size, generator=generator).to(self.device)
        leaves = list(model.parameters())

        steps, records = {}, {}
        for objective in objectives:
            backend, variant = objective
            why_not = backend != "ce" and impls_.unavailable(backend, self.device)
            if why_not:
                records[objective] = _training_record(objective, "unavailable", why_not)
                continue
            if backend == "ce":
                criterion = lambda features, logits, labels: crl_ops.cross_entropy(logits, labels)  # noqa: E731
            else:
                criterion = crl_ops.BalancedLoss(variant.mode, variant.form, backend=backend)
            steps[objective] = lambda criterion=criterion: criterion(*model(images), inputs.labels)
            records[objective] = _training_record(objective, "budget", "time budget spent before timing")

        samples = {}
        for objective, step in steps.items():
            try:
                self._call(lambda: time_step(step, leaves, self.clock, 0.0, 2, 2))  # warm-up
                samples[objective] = []
            except CaseFailed as failure:
                records[objective].update(status=failure.status, reason=str(failure))
        for _ in range(2):
            for objective in samples:
                if self.seconds_left() <= 0 or records[objective]["status"] in ("oom", "error"):
                    continue
                try:
                    samples[objective].append(self._call(lambda: time_step(
                        steps[objective], leaves, self.clock, self.settings.min_seconds, self.settings.min_repeats,
                        self.settings.max_repeats, update=optimiser.step)))
                except CaseFailed as failure:
                    records[objective].update(status=failure.status, reason=str(failure))
        for objective, rounds in samples.items():
            if rounds and records[objective]["status"] not in ("oom", "error"):
                records[objective].update(status="ok", reason=None, **_timing_fields(rounds))
        return list(records.values())


def _record(group: Group, impl: str) -> dict:
    return {"shape": group.shape.as_dict(), "shape_text": group.shape.describe(), "variant": group.variant.name,
            "impl": impl, "tags": sorted(group.tags), "status": "budget", "reason": "time budget spent"}


def _training_record(objective, status: str, reason: Optional[str]) -> dict:
    backend, variant = objective
    return {"objective": "CE" if backend == "ce" else f"CE + CRL {variant.name} ({backend})",
            "backend": backend, "variant": None if variant is None else variant.name,
            "batch_size": TRAINING_BATCH, "status": status, "reason": reason}


def _timing_fields(rounds: List[Samples]) -> dict:
    pooled = Samples()
    for r in rounds:
        pooled.extend(r)
    return {
        "forward": summary(pooled.forward),
        "backward": summary(pooled.backward),
        "total": summary(pooled.total),
        "round_medians": [summary(r.total)["median"] for r in rounds],
    }
