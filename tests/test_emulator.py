"""The emulated CUDA device's own tests (tests/cuda_emulation.py): each bug of INJECTED_BUGS,
written into a copy of the kernels, must be reported the way the execution model promises, and
the device's runs must differ where a GPU's would (thread orders change float atomics' sums),
without changing anything that must not change.

Each injected bug builds the emulated library from a copy of crl_ops/csrc with one change (only
the changed file recompiles) and runs a small CRL step on it in a subprocess, under every entry of
RUNS, against the CPU kernels (emulation_probe.py): it prints the error the emulator raised, or
whether the results matched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from crl_ops import _native

from . import cuda_emulation
from .cuda_emulation import RUNS, RunConfig

REPOSITORY = Path(__file__).resolve().parent.parent


class Bug(NamedTuple):
    name: str
    file: str  # under crl_ops/csrc
    old: str  # text replaced, once (it must occur exactly once)
    new: str
    variant: str  # the build that must report it
    expected: str  # in the probe's output
    case: str = "small"  # the probe's case (emulation_probe.CASES)


INJECTED_BUGS = [
    Bug("missing-barrier", "cuda/profile.cu",
        "c < max_classes; c += blockDim.x) h[c] = 0;\n    __syncthreads();",
        "c < max_classes; c += blockDim.x) h[c] = 0;",
        "default", "MISMATCH"),
    Bug("missing-barrier-racecheck", "cuda/profile.cu",
        "c < max_classes; c += blockDim.x) h[c] = 0;\n    __syncthreads();",
        "c < max_classes; c += blockDim.x) h[c] = 0;",
        "racecheck", "race on shared memory: dynamic shared memory"),
    Bug("divergent-barrier", "cuda/profile.cu",
        "    __syncthreads();  // the previous attribute's counts are consumed",
        "    if (threadIdx.x < 512) __syncthreads();",
        "default", "the block's threads wait at different barriers"),
    Bug("wrong-mask", "cuda/cuda_common.cuh",
        "value = op(value, __shfl_down_sync(kFullMask, value, offset));",
        "value = op(value, __shfl_down_sync(0x0000ffffu, value, offset));",
        "default", "which its mask 0x0000ffff does not name"),
    Bug("exited-lane", "cuda/profile.cu",
        "      const unsigned same = __match_any_sync(",
        "      if (threadIdx.x >= 1000) return;\n      const unsigned same = __match_any_sync(",
        "default", "which has exited"),
    Bug("lane-waits-elsewhere", "cuda/profile.cu",
        "  if (warp == 0) {\n    for (int t = 0; t < kN; ++t) {",
        "  if (threadIdx.x < 16) {\n    for (int t = 0; t < kN; ++t) {",
        "default", "which waits at __syncthreads"),
    Bug("short-shared-memory", "cuda/profile.cu",
        "static_cast<size_t>(max_classes) * sizeof(int64_t)",
        "static_cast<size_t>(max_classes) * sizeof(int64_t) - 8",
        "sanitize", "heap-buffer-overflow"),
    Bug("uninitialised-read", "cuda/profile.cu",
        "c < max_classes; c += blockDim.x) h[c] = 0;",
        "c < max_classes; c += blockDim.x) {}",
        "default", "MISMATCH"),
    Bug("non-atomic-update", "cuda/profile.cu",
        "atomicAdd(reinterpret_cast<unsigned long long*>(h + label), static_cast<unsigned long long>(__popc(same)));",
        "h[label] += __popc(same);",
        "racecheck", "race on shared memory: dynamic shared memory"),
    Bug("non-atomic-update-default", "cuda/profile.cu",
        "atomicAdd(reinterpret_cast<unsigned long long*>(h + label), static_cast<unsigned long long>(__popc(same)));",
        "h[label] += __popc(same);",
        "default", "SAME"),  # one thread runs at a time: only the race check sees it
    Bug("out-of-bounds-read", "cuda/profile.cu",
        "const int64_t label = i < batch ? labels[i * attributes + j] : -1;",
        "const int64_t label = labels[i * attributes + j];",
        "sanitize", "heap-buffer-overflow"),
    Bug("too-many-threads", "cuda/profile.cu",
        "constexpr int kProfileThreads = 1024;", "constexpr int kProfileThreads = 2048;",
        "default", "invalid launch: a block of 2048 x 1 x 1 threads"),
    Bug("shared-memory-over-48-kib", "cuda/profile.cu",
        "constexpr int64_t kSharedClasses = 4096;", "constexpr int64_t kSharedClasses = 8192;",
        "default", "a block may use without cudaFuncSetAttribute", case="6000-classes"),
]


def _environment(variant: str) -> dict:
    """The environment of a process that loads the emulated build `variant` from this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPOSITORY), *sys.path]))
    env.update(cuda_emulation.sanitizer_environment() if variant == "sanitize"
               else {cuda_emulation.ENVIRONMENT_VARIABLE: variant})
    return env


def _run_probe(library: Path, case: str, variant: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.emulation_probe", str(library), case], capture_output=True,
                          text=True, env=_environment(variant), timeout=600, cwd=REPOSITORY)


def _probe(bug: Bug, tmp: Path) -> str:
    """Builds the bug's library and runs the probe on it; returns its output."""
    sources = tmp / bug.name / "csrc"
    shutil.copytree(REPOSITORY / "crl_ops" / "csrc", sources)
    path = sources / bug.file
    text = path.read_text()
    assert text.count(bug.old) == 1, f"{bug.name}: the text to replace must occur once in {bug.file}"
    path.write_text(text.replace(bug.old, bug.new))
    process = _run_probe(cuda_emulation.library_path(bug.variant, sources), bug.case, bug.variant)
    return process.stdout + process.stderr


@pytest.fixture(scope="module")
def probe_outputs(tmp_path_factory):
    """Every bug's probe, two at a time (the builds share one lock; the probes run in parallel)."""
    _native.require("cpu")
    tmp = tmp_path_factory.mktemp("injected")
    with ThreadPoolExecutor(2) as pool:
        outputs = pool.map(lambda bug: _probe(bug, tmp), INJECTED_BUGS)
        return dict(zip((b.name for b in INJECTED_BUGS), outputs))


@pytest.mark.parametrize("bug", INJECTED_BUGS, ids=[b.name for b in INJECTED_BUGS])
def test_injected_bug_is_reported(bug, probe_outputs):
    output = probe_outputs[bug.name]
    assert bug.expected in output, output[-4000:]
    if bug.expected not in ("MISMATCH", "SAME"):
        assert "ERROR" in output or "AddressSanitizer" in output, output[-4000:]


def test_unchanged_kernels_pass_the_probe(tmp_path):
    """The probe itself: the unchanged kernels give the CPU's results in every run."""
    _native.require("cpu")
    library = cuda_emulation.library_path("default")
    for case in ("small", "6000-classes"):
        process = _run_probe(library, case, "default")
        assert process.returncode == 0 and "SAME" in process.stdout, process.stdout + process.stderr


# ---- the runs themselves ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated():
    _native.require("cpu")
    return cuda_emulation.EmulatedCuda()


def _atomic_gradient(emulated, run):
    from .test_cuda import CASES, crl_op, problem_of

    case = CASES[4]  # B = 1500: many pairs end at the same sample
    with emulated.kernels(run):
        return crl_op(problem_of(case, 1), emulated.device, case.dtype, "instance", "relative", case.k)


def test_thread_orders_change_the_order_of_float_atomics(emulated):
    """The runs interleave threads differently: the atomic backward's sums round differently across
    orders, while the mined pairs and the forward stay bitwise equal."""
    forward, reverse = (_atomic_gradient(emulated, run) for run in RUNS[:2])
    assert not torch.equal(forward.grad, reverse.grad)
    torch.testing.assert_close(forward.grad, reverse.grad, rtol=1e-4, atol=1e-6)
    for name in ("partners", "distances", "loss", "sums"):
        assert torch.equal(getattr(forward, name), getattr(reverse, name)), name


def test_portable_context_switch_gives_the_same_results(emulated):
    """The ucontext fallback runs the same schedule as the fast switch: bitwise the same results."""
    fast = _atomic_gradient(emulated, RUNS[1])
    portable = _atomic_gradient(emulated, RunConfig(*RUNS[1][:3], switch="ucontext"))
    for a, b in zip(fast, portable):
        assert torch.equal(a, b)


def test_statistics_count_the_threads_that_ran(emulated):
    """A profile launch runs one block of 1024 threads per attribute, each thread a fiber."""
    labels = torch.randint(0, 2, (50, 3))
    before = emulated.statistics()
    with emulated.kernels():
        torch.ops.crl_ops.profile(labels, torch.tensor([2, 2, 2]), 2, 0.5, True)
    after = emulated.statistics()
    assert after["launches"] - before["launches"] == 1
    assert after["blocks"] - before["blocks"] == 3
    assert after["threads"] - before["threads"] == 3 * 1024
    assert after["switches"] - before["switches"] > 3 * 1024


def test_configure_rejects_bad_values(emulated):
    with pytest.raises(ValueError, match="order must be"):
        torch.ops.crl_ops_emulated.configure("backwards", 0, 0, "fast")
    with pytest.raises(ValueError, match="poison must be a byte"):
        torch.ops.crl_ops_emulated.configure("forward", 0, 256, "fast")
    with pytest.raises(ValueError, match="switch must be"):
        torch.ops.crl_ops_emulated.configure("forward", 0, 0, "setjmp")


@pytest.fixture(scope="module")
def sanitized_runs():
    """A smaller set of tests/test_cuda.py (SANITIZED_SELECTION) on the AddressSanitizer +
    UndefinedBehaviorSanitizer build and on the race-checked build, each in a process of its own,
    both at once."""
    started = {}
    for variant in ("sanitize", "racecheck"):
        cuda_emulation.library_path(variant)  # built here, one at a time, not by both processes at once
        started[variant] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k",
             SANITIZED_SELECTION], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_environment(variant), cwd=REPOSITORY)
    return {variant: (process.communicate(timeout=1800)[0], process.returncode) for variant, process in started.items()}


@pytest.mark.parametrize("variant", ["sanitize", "racecheck"])
def test_sanitized_builds_pass_the_cuda_tests(variant, sanitized_runs):
    output, returncode = sanitized_runs[variant]
    assert returncode == 0, output[-6000:]
    assert " passed" in output and " failed" not in output, output[-2000:]


# The sanitized builds' set: every kernel and op, each dtype, the K > 64 lists and K = 1024, B above
# 1024, unstaged histograms, a warp per row, both backward paths, the pair ops, the class lists and
# the steps of distributed=True (value checks, partial vector, finishing step, partner table).
SANITIZED_SELECTION = (
    "emulated and ("
    "(test_matches_cpu_kernels and pooled and (binary-float32-k5 or list-bfloat16-k100-bins1000 or shared-float64-k64"
    " or many-classes-float32-k5 or k1024 or list-float16-k40))"
    " or (test_deterministic_path_matches_cpu_kernels and instance)"
    " or (test_pair_ops_match_cpu_kernels and (binary-float32-k5 or shared-float64-k64))"
    " or (test_class_lists_match_cpu_kernels and (list-float16-k40 or many-classes))"
    " or test_unchecked_out_of_range_labels_are_not_annotated"
    " or (test_distributed_steps_match_cpu_kernels and binary-float32-k5)"
    " or (test_shard_loss_is_bitwise_the_cpus and distribution) or test_partner_table_is_bitwise_the_cpus"
    ")"
)
