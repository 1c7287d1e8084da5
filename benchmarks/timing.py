"""Timing and peak memory of one forward + backward step, on the CPU or a CUDA device.

Every repeat times the forward and the backward separately: with `time.perf_counter` on the CPU,
with CUDA events (and one synchronisation per repeat) on a GPU. Peak memory is measured on a
separate step: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the growth of the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs), after glibc has been
asked to hand freed memory back (malloc_trim) so that reused pages do not hide an allocation.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

Step = Callable[[], torch.Tensor]  # runs a forward pass and returns the scalar loss


@dataclass
class Samples:
    forward: List[float] = field(default_factory=list)  # seconds per repeat
    backward: List[float] = field(default_factory=list)

    @property
    def total(self) -> List[float]:
        return [f + b for f, b in zip(self.forward, self.backward)]

    def extend(self, other: "Samples") -> None:
        self.forward += other.forward
        self.backward += other.backward


def summary(values: List[float]) -> dict:
    """Median and interquartile range, in seconds."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": len(values)}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


class Clock:
    """Wall time of stretches of work on one device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        # Call after sync(): events are read once the device has passed them.
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


def _clear_grads(leaves) -> None:
    for leaf in leaves:
        leaf.grad = None


def run_step(step: Step, leaves) -> torch.Tensor:
    """One forward + backward; returns the detached loss."""
    _clear_grads(leaves)
    loss = step()
    loss.backward()
    return loss.detach()


def time_step(step: Step, leaves, clock: Clock, min_seconds: float, min_repeats: int, max_repeats: int,
              update: Optional[Callable[[], None]] = None) -> Samples:
    """Repeats forward + backward until both min_seconds and min_repeats are reached (or max_repeats).

    `update` (an optimiser step) runs after each backward and is timed with it."""
    samples = Samples()
    clock.sync()
    started = time.perf_counter()
    while len(samples.forward) < max_repeats and (
            len(samples.forward) < min_repeats or time.perf_counter() - started < min_seconds):
        _clear_grads(leaves)
        start = clock.mark()
        loss = step()
        middle = clock.mark()
        loss.backward()
        if update is not None:
            update()
        end = clock.mark()
        clock.sync()
        samples.forward.append(clock.seconds(start, middle))
        samples.backward.append(clock.seconds(middle, end))
    return samples


def time_call(fn: Callable[[], object], clock: Clock, min_seconds: float, min_repeats: int,
              max_repeats: int) -> List[float]:
    """Seconds per call of fn (no backward), repeated as time_step repeats."""
    times: List[float] = []
    clock.sync()
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < min_seconds):
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.seconds(start, end))
    return times


# ---- peak memory ----------------------------------------------------------------------------------

def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return libc
    except OSError:
        return None


_LIBC = _libc()


def cpu_memory_supported() -> bool:
    return _LIBC is not None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_memory(step: Step, leaves, device: torch.device) -> Tuple[Optional[int], float]:
    """One forward + backward: (bytes allocated at its peak above what was allocated before it, or None
    where this cannot be measured; its wall time in seconds, without the bookkeeping around it)."""
    _clear_grads(leaves)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        run_step(step, leaves)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return torch.cuda.max_memory_allocated(device) - before, seconds
    if _LIBC is None:
        started = time.perf_counter()
        run_step(step, leaves)
        return None, time.perf_counter() - started
    _LIBC.malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    started = time.perf_counter()
    run_step(step, leaves)
    seconds = time.perf_counter() - started
    return max(0, _status_kib("VmHWM") - before) * 1024, seconds
