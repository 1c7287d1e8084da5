"""The emulated CUDA device of the tests (crl_ops/csrc/emulation/device.h states its model).

The CUDA kernels of crl_ops/csrc/cuda and their op glue compile with the host compiler into a
test-only library that registers the op schemas under `crl_ops_emulated`, with the CUDA entry
points as their CPU kernels: CPU tensors stand for device memory. `EmulatedCuda.kernels()` puts
them in place of crl_ops's CPU kernels for a while, so that everything above the ops (the module,
autograd, the reference's checks) runs unchanged on the CUDA kernels.

Three builds, each cached in build/cuda-emulation under a key of its sources, flags and torch:
- "default" (-O2): the thread orders, poison bytes and every check of the execution model;
- "sanitize": the kernels under AddressSanitizer and UndefinedBehaviorSanitizer (the process
  must start with the sanitizers' runtimes preloaded: `sanitizer_environment()`);
- "racecheck": the kernels instrumented for the shared-memory race check.
CRL_OPS_CUDA_EMULATION names the build a process loads ("default" when unset). With
CRL_OPS_EMULATION_COVERAGE=FILE, a process writes to FILE, as JSON, the tests that called each op
on the emulated device (docs/kernels.md reports the counts).

`python -m tests.cuda_emulation [variant ...]` builds them ahead of the tests.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from crl_ops import _build

REPOSITORY = Path(__file__).resolve().parent.parent
SOURCES = REPOSITORY / "crl_ops" / "csrc"
EMULATION = SOURCES / "emulation"
BUILD_ROOT = REPOSITORY / "build" / "cuda-emulation"
VARIANTS = ("default", "sanitize", "racecheck")
ENVIRONMENT_VARIABLE = "CRL_OPS_CUDA_EMULATION"
OPS = ("profile", "class_lists", "mine_class", "mine_instance", "pair_distances", "pair_distances_backward",
       "pair_sums", "pair_sums_backward", "shard_mine", "shard_table", "shard_table_backward", "table_distances",
       "table_distances_backward", "shard_sums", "shard_sums_backward", "shard_loss", "shard_loss_backward",
       "crl_loss", "crl_loss_backward")

# Each variant's flags for the kernels (.cu) and the emulator's runtime; the op glue (cuda/*_ops.cpp,
# emulation/emulated_ops.cpp) is compiled once for all of them.
KERNEL_FLAGS = {
    "default": ["-O2"],
    "sanitize": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "racecheck": ["-O1", "-g", "-fsanitize=thread"],
}
RUNTIME_FLAGS = ["-O2"]
LINK_FLAGS = {"default": [], "sanitize": ["-fsanitize=address,undefined"], "racecheck": []}
COMMON_FLAGS = ["-fPIC", "-DNDEBUG", "-ffp-contract=off", _build.abi_flag()]
KERNEL_STANDARD = "-std=c++17"  # as nvcc is given (crl_ops/_build.py)


class Unit(NamedTuple):
    source: Path
    flags: tuple


def _include_flags(sources: Path) -> list[str]:
    """The stand-in CUDA headers first, then the sources and torch's headers."""
    return ["-I", str(sources / "emulation" / "include"), "-I", str(sources), *_build.torch_include_flags()]


def _units(variant: str, sources: Path) -> list[Unit]:
    """The op glue (cuda/*_ops.cpp but the CUDA registration, emulation/emulated_ops.cpp), the kernels
    (cuda/*.cu) with the device header forced in, and the emulator's runtime."""
    glue_flags = ("-O1", _build.cxx_standard_flag(), *COMMON_FLAGS)
    glue = [p for p in sorted((sources / "cuda").glob("*_ops.cpp")) if p.name != "cuda_ops.cpp"]
    kernel_flags = ("-x", "c++", "-include", str(sources / "emulation" / "device.h"), KERNEL_STANDARD, *COMMON_FLAGS,
                    *KERNEL_FLAGS[variant])
    runtime_flags = (KERNEL_STANDARD, *COMMON_FLAGS, *RUNTIME_FLAGS)
    units = [Unit(p, glue_flags) for p in glue + [sources / "emulation" / "emulated_ops.cpp"]]
    units += [Unit(p, kernel_flags) for p in sorted((sources / "cuda").glob("*.cu"))]
    units.append(Unit(sources / "emulation" / "runtime.cpp", runtime_flags))
    if variant == "racecheck":
        units.append(Unit(sources / "emulation" / "racecheck.cpp", runtime_flags))
    return units


def _object_name(unit: Unit, sources: Path, headers: bytes) -> str:
    """An object's name: its source's name and a key of what goes into it (the source, every header,
    the flags with the source tree's own paths left out, torch and the compiler), so that a tree with
    one changed file recompiles that file alone."""
    digest = hashlib.sha256(unit.source.read_bytes() + headers)
    digest.update(" ".join(f.replace(str(sources), "<sources>") for f in unit.flags).encode())
    digest.update(" ".join([torch.__version__, str(torch.version.git_version), _build._cxx()]).encode())
    return f"{unit.source.stem}-{unit.source.suffix[1:]}-{digest.hexdigest()[:16]}.o"


def _compile(units: list[Unit], sources: Path) -> list[Path]:
    """The objects of `units` in build/cuda-emulation/objects, compiled in parallel where missing."""
    headers = b"".join(str(p.relative_to(sources)).encode() + p.read_bytes()
                       for p in sorted(sources.rglob("*")) if p.suffix in (".h", ".cuh"))
    directory = BUILD_ROOT / "objects"
    directory.mkdir(parents=True, exist_ok=True)
    objects, commands = [], []
    for unit in units:
        obj = directory / _object_name(unit, sources, headers)
        objects.append(obj)
        if not obj.exists():
            commands.append([_build._cxx(), *unit.flags, *_include_flags(sources), "-c", str(unit.source),
                             "-o", f"{obj}.{os.getpid()}.tmp"])
    jobs = _build.max_jobs()
    with ThreadPoolExecutor(max(1, min(jobs, len(commands) or 1))) as pool:
        results = list(pool.map(_build._run, commands))
    for argv, returncode, output in results:
        if returncode != 0:
            raise RuntimeError(f"compiling the emulated CUDA device failed:\n$ {' '.join(argv)}\n{output[-6000:]}")
        temporary = argv[argv.index("-o") + 1]
        os.replace(temporary, temporary.rsplit(".", 2)[0])
    return objects


def library_path(variant: str, sources: Path = SOURCES) -> Path:
    """The emulated ops' library of `variant` built from the source tree `sources` (crl_ops/csrc, or
    a changed copy of it), linked first where it is not in the cache."""
    if variant not in VARIANTS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {VARIANTS}, got {variant!r}")
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with _build.locked(BUILD_ROOT / "lock", timeout=1800):
        objects = _compile(_units(variant, sources), sources)
        key = hashlib.sha256(" ".join([o.name for o in objects] + LINK_FLAGS[variant]).encode()).hexdigest()[:16]
        target = BUILD_ROOT / f"{variant}-{key}" / "libcrl_ops_emulated.so"
        if target.exists():
            return target
        target.parent.mkdir(exist_ok=True)
        torch_lib = Path(torch.__file__).parent / "lib"
        link = [_build._cxx(), "-shared", "-o", f"{target}.tmp", *map(str, objects), *LINK_FLAGS[variant],
                "-L", str(torch_lib), f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
        argv, returncode, output = _build._run(link)
        if returncode != 0:
            raise RuntimeError(f"linking the emulated CUDA device failed:\n$ {' '.join(argv)}\n{output[-6000:]}")
        os.replace(f"{target}.tmp", target)
    return target


def sanitizer_environment() -> dict:
    """The environment of a process that loads the "sanitize" build: the sanitizers' runtimes
    preloaded (they must come first), no leak check (Python keeps its objects)."""
    cxx = _build._cxx()
    runtimes = [subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                for name in ("libasan.so", "libubsan.so")]
    return {"LD_PRELOAD": ":".join(runtimes), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", ENVIRONMENT_VARIABLE: "sanitize"}


class RunConfig(NamedTuple):
    order: str
    seed: int
    poison: int
    switch: str = "fast"  # or "ucontext": the portable context switch


# The runs of every emulated test: each thread and block order, each with its poison byte (0xff makes
# an unwritten float NaN and an unwritten index -1; 0xa5 and 0x5a neither), results bitwise equal.
RUNS = (RunConfig("forward", 0, 0xA5), RunConfig("reverse", 0, 0xFF), RunConfig("random", 7, 0x5A))


class EmulatedCuda:
    """The emulated CUDA device: tensors on the CPU, and inside `kernels()` crl_ops's CPU kernels
    replaced by the CUDA ones."""

    name = "emulated"
    emulated = True
    device = torch.device("cpu")
    runs = RUNS

    def __init__(self, variant: str | None = None, library: Path | None = None):
        """Loads the build `variant` (CRL_OPS_CUDA_EMULATION, else "default"), or the given library."""
        self.variant = variant or os.environ.get(ENVIRONMENT_VARIABLE, "default")
        if self.variant == "sanitize" and "libasan" not in os.environ.get("LD_PRELOAD", ""):
            raise RuntimeError("the sanitize build of the emulated device needs a process started with "
                               "tests.cuda_emulation.sanitizer_environment() (libasan preloaded)")
        path = library or library_path(self.variant)
        if str(path) not in torch.ops.loaded_libraries:
            torch.ops.load_library(str(path))

    @contextlib.contextmanager
    def kernels(self, run: RunConfig = RUNS[0]) -> Iterator[None]:
        """crl_ops's ops run the emulated CUDA kernels, in `run`'s order and with its poison byte."""
        torch.ops.crl_ops_emulated.configure(run.order, run.seed, run.poison, run.switch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            library = torch.library.Library("crl_ops", "IMPL")
            for name in OPS:
                library.impl(name, self._op(name), "CPU")
        try:
            yield
        finally:
            library._destroy()

    @staticmethod
    def _op(name):
        """The emulated op `name`; under CRL_OPS_EMULATION_COVERAGE, one that notes the test calling it."""
        op = getattr(torch.ops.crl_ops_emulated, name).default
        if not os.environ.get("CRL_OPS_EMULATION_COVERAGE"):
            return op

        def noted(*args, **kwargs):
            _COVERAGE[name].add(os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0])
            return op(*args, **kwargs)

        return noted

    @staticmethod
    def statistics() -> dict:
        launches, blocks, threads, switches, memsets = torch.ops.crl_ops_emulated.statistics()
        return {"launches": launches, "blocks": blocks, "threads": threads, "switches": switches, "memsets": memsets}


_COVERAGE: dict = collections.defaultdict(set)


@atexit.register
def _write_coverage():
    path = os.environ.get("CRL_OPS_EMULATION_COVERAGE")
    if path and _COVERAGE:
        Path(path).write_text(json.dumps({op: sorted(tests) for op, tests in sorted(_COVERAGE.items())}, indent=1))


if __name__ == "__main__":
    for name in sys.argv[1:] or ["default"]:
        print(library_path(name))
