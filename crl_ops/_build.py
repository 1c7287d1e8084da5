"""The native kernels without a prebuilt extension: the C++/CUDA sources ship in crl_ops/csrc and
the first native use compiles them, once, into torch's extension cache.

`ensure(device_type)` is the entry point (crl_ops._native calls it). It registers the kernels
from the first of: CRL_OPS_LIBRARY (a CMake-built libcrl_ops.so), the prebuilt extension
crl_ops._C (`pip install --no-build-isolation .`, `make build`, a binary wheel), a library
already compiled into the cache, or a fresh compile into the cache.

Two libraries can be compiled, each in a cache folder of its own keyed by everything that goes
into it (crl_ops version, sources, torch build, compiler, flags, CUDA architectures):
- "cpu": csrc/*.cpp (except python_module.cpp) and csrc/cpu/*.cpp: the op schemas, the CPU
  kernels and the autograd registration;
- "cuda": csrc/cuda/*.cpp and *.cu: only CUDA registrations, loaded on top of the schemas of
  either the "cpu" library or the prebuilt crl_ops._C.
The compiler is driven directly (one process per translation unit, then a link, none outliving
this process: CompilerProcesses), so neither ninja nor setuptools is needed. A failed compile is
remembered in its cache folder when the sources failed, not when the machine did (killed, out of
disk or memory): remembered_failure. setup.py loads this file by path for the same source lists and
flags, so it imports nothing from crl_ops at module level.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("crl_ops")

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "csrc"
PYTHON_MODULE_SOURCE = "python_module.cpp"  # only for the setuptools extension crl_ops._C

# Flags that matter for exactness: no contraction into fused multiply-adds, so that the CPU and
# CUDA kernels round alike (docs/kernels.md). The C++ standard is torch's: cxx_standard_flag().
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17", "-lineinfo"]

DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
PROBE_OP = "crl_ops::profile"
LOCK_TIMEOUT_S = 20 * 60  # CRL_OPS_LOCK_TIMEOUT overrides
EXPECTED_DURATION = {"cpu": "about a minute", "cuda": "a few minutes per CUDA architecture"}
BUILD_LOG = "build.log"
DIGEST_SUFFIX = ".digest"  # beside a compiled library: its size and BLAKE2b digest, written when its build ends
FAILED_MARK = "failed"  # a compile that failed on its sources is not retried on every use (remembered_failure)


def core_sources(source_dir: str | os.PathLike = SOURCE_DIR) -> list[str]:
    """The sources of the core library, found by glob so that new files join without edits here."""
    top = [p for p in sorted(glob.glob(os.path.join(source_dir, "*.cpp"))) if os.path.basename(p) != PYTHON_MODULE_SOURCE]
    return top + sorted(glob.glob(os.path.join(source_dir, "cpu", "*.cpp")))


def cuda_sources(source_dir: str | os.PathLike = SOURCE_DIR) -> list[str]:
    return sorted(glob.glob(os.path.join(source_dir, "cuda", "*.cpp")) + glob.glob(os.path.join(source_dir, "cuda", "*.cu")))


def cxx_standard_flag() -> str:
    """The C++ standard the installed torch's headers require (C++17 up to torch 2.13, C++20 from
    2.14, whose c10 headers use std::strong_ordering), as their own #error line states it."""
    header = Path(torch.__file__).parent / "include" / "torch" / "csrc" / "api" / "include" / "torch" / "all.h"
    with contextlib.suppress(OSError):
        found = re.search(r"C\+\+(\d+) or later compatible compiler is required", header.read_text())
        if found:
            return f"-std=c++{found.group(1)}"
    return "-std=c++17"


def cuda_wheel_include_dirs() -> list[str]:
    """The CUDA wheel of torch ships the CUDA library headers (cuBLAS, ...) that torch's own
    headers include under site-packages/nvidia/cu*/include; a full toolkit has them already."""
    found = []
    for site in sys.path:
        for path in sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include"))):
            if path not in found:
                found.append(path)
    return found


class BuildError(Exception):
    """Why the kernels could not be compiled or loaded: one sentence for the user."""


@dataclass(frozen=True)
class Library:
    """One shared library to compile, with everything that decides its binary."""

    part: str  # "cpu" or "cuda"
    sources: tuple[str, ...]
    cxx: str  # resolved path of the C++ compiler
    nvcc: str | None  # resolved path of nvcc ("cuda" only)
    cxx_flags: tuple[str, ...]
    nvcc_flags: tuple[str, ...]
    link_flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"crl_ops_{self.part}"

    @property
    def kind(self) -> str:
        return DISPATCH_KEYS[self.part]

    def key(self) -> str:
        """Hash of what the binary depends on: any change gives a new cache folder."""
        digest = hashlib.sha256()

        def add(*items):
            for item in items:
                digest.update(str(item).encode() + b"\0")

        add(package_version(), torch.__version__, torch.version.git_version, torch.version.cuda, sys.platform)
        add(self.part, self.cxx, self.nvcc, *self.cxx_flags, "|", *self.nvcc_flags, "|", *self.link_flags)
        headers = [p for p in glob.glob(os.path.join(SOURCE_DIR, "**", "*"), recursive=True) if p.endswith((".h", ".cuh"))]
        for path in sorted(self.sources) + sorted(headers):
            add(os.path.relpath(path, SOURCE_DIR), hashlib.sha256(Path(path).read_bytes()).hexdigest())
        return digest.hexdigest()[:16]


def package_version() -> str:
    """crl_ops.__version__, read from the file: ensure() may run while crl_ops is still importing."""
    match = re.search(r'^__version__ = "([^"]+)"', (PACKAGE_DIR / "__init__.py").read_text(), re.M)
    return match.group(1) if match else "unknown"


def cache_root() -> Path:
    """torch's extension directory: TORCH_EXTENSIONS_DIR, else the per-user cache torch uses."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch._appdirs  # what torch.utils.cpp_extension.get_default_build_root uses
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(torch._appdirs.user_cache_dir(appname="torch_extensions")) / f"{python}_{accelerator}"


def _cxx() -> str:
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"no C++ compiler: `{name}` is not on PATH (install g++ or set CXX)")
    return os.path.realpath(path)


def cuda_home() -> str | None:
    """CUDA_HOME or CUDA_PATH, else the toolkit of the nvcc on PATH, else /usr/local/cuda. A
    toolkit has include/cuda_runtime_api.h: an nvcc wrapper script (/usr/local/bin/nvcc that runs
    /usr/local/cuda-13.0/bin/nvcc) does not make /usr/local a toolkit."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "include", "cuda_runtime_api.h")):
            return candidate
    return candidates[0] if nvcc else None


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its warning that no GPU is visible: compiling
    for the architectures in TORCH_CUDA_ARCH_LIST needs none."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        torch_logger.setLevel(level)
    return cpp_extension


def _cuda_arch_flags() -> list[str]:
    cpp_extension = _cpp_extension()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        raise BuildError(
            "no GPU is visible to choose the CUDA architectures: set TORCH_CUDA_ARCH_LIST (e.g. '9.0' for H100/H200)"
        )
    try:
        return cpp_extension._get_cuda_arch_flags()
    except ValueError as error:  # an unknown architecture in TORCH_CUDA_ARCH_LIST
        raise BuildError(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r}: {error}") from None


def library(part: str) -> Library:
    """What to compile for `part`; raises BuildError when this machine cannot compile it."""
    abi = abi_flag()
    common = [cxx_standard_flag(), "-fPIC", "-DNDEBUG", abi]
    if part == "cpu":
        return Library("cpu", tuple(core_sources()), _cxx(), None, tuple(CXX_FLAGS + common), (), tuple(LINK_FLAGS))
    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} is built without CUDA")
    home = cuda_home()
    nvcc = home and shutil.which(os.path.join(home, "bin", "nvcc"))
    if not nvcc:
        raise BuildError(
            f"the CUDA kernels need nvcc (CUDA {torch.version.cuda}, as torch): none found at CUDA_HOME or on PATH"
        )
    nvcc_flags = NVCC_FLAGS + _cpp_extension().COMMON_NVCC_FLAGS + _cuda_arch_flags() + ["--compiler-options", "-fPIC", "-DNDEBUG", abi]
    if os.environ.get("CXX"):
        nvcc_flags += ["-ccbin", _cxx()]
    return Library(
        "cuda", tuple(cuda_sources()), _cxx(), os.path.realpath(nvcc), tuple(CXX_FLAGS + common), tuple(nvcc_flags), ()
    )


def abi_flag() -> str:
    """The C++ ABI flag torch was built with: every object of an extension must use it."""
    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def torch_include_flags() -> list[str]:
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    return ["-isystem", torch_include, "-isystem", os.path.join(torch_include, "torch", "csrc", "api", "include")]


def _include_flags(part: str) -> list[str]:
    flags = ["-I", str(SOURCE_DIR), *torch_include_flags()]
    if part == "cuda":
        cuda_include = os.path.join(cuda_home(), "include")
        # gcc must not be given /usr/include (a distribution's toolkit in /usr) as a system directory
        for path in ([cuda_include] if cuda_include != "/usr/include" else []) + cuda_wheel_include_dirs():
            flags += ["-isystem", path]
    return flags


def _link_libraries(part: str) -> list[str]:
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    flags = ["-L", torch_lib, f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
    if part == "cuda":
        home = cuda_home()
        cuda_lib = os.path.join(home, "lib64") if os.path.isdir(os.path.join(home, "lib64")) else os.path.join(home, "lib")
        flags += ["-lc10_cuda", "-ltorch_cuda", "-L", cuda_lib, "-lcudart"]
    return flags


def _check_nvcc_version(nvcc: str) -> None:
    """nvcc must be the CUDA major version torch was built with: the runtime library is shared."""
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", output)
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        raise BuildError(f"nvcc {nvcc} is CUDA {found.group(1)}.{found.group(2)} but torch is built with CUDA {torch.version.cuda}")


# ---- the compiler processes: none outlives the process that started it -----------------------------

# Each compiler runs under this sh guard, the leader of a process group of its own that holds the
# compiler and what the compiler starts (cc1plus, as, cicc, ptxas): a driver killed alone would
# leave those running. On SIGTERM, which Linux sends it when the thread that started it dies
# (PR_SET_PDEATHSIG; a process killed by SIGKILL too), it kills the whole group. Its exit status is
# the compiler's, 128 + N for a compiler killed by signal N.
COMPILER_GUARD = 'trap "kill -KILL 0" TERM; "$@" & wait $!'
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.lru_cache(maxsize=None)
def _prctl():
    """libc's prctl on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent():
    """A preexec_fn that has the kernel send SIGTERM to the child when the thread that started it
    dies (Linux); None elsewhere, where only an exception in this process stops its compilers."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: no signal would come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class CompilerProcesses:
    """Runs the compiler processes of one build, from any number of threads. Leaving its `with`
    block by an exception (KeyboardInterrupt included) kills the processes still running, with what
    they started, and starts no more, so that the exception does not wait for their compiles."""

    def __init__(self, environment: dict | None = None):
        self.environment = environment
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopped = False

    def __enter__(self) -> "CompilerProcesses":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.stop()

    def run(self, argv: list[str]) -> tuple[list[str], int, str]:
        """argv's exit status and output (stderr included); status 127 when it cannot start."""
        with self._lock:  # so that stop() sees every process started
            if self._stopped:
                return argv, 128 + signal.SIGKILL, "not started: the build was interrupted"
            try:
                process = subprocess.Popen(
                    ["/bin/sh", "-c", COMPILER_GUARD, "sh", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, errors="replace", env=self.environment, start_new_session=True,
                    preexec_fn=_die_with_parent(),
                )
            except OSError as error:
                return argv, 127, str(error)
            self._running.add(process)
        try:
            output, _ = process.communicate()
        finally:
            with self._lock:
                self._running.discard(process)
        return argv, process.returncode, output

    def stop(self) -> None:
        """Kills the running processes' groups and waits (a few seconds at most) for them to end."""
        with self._lock:
            self._stopped = True
            running = [process for process in self._running if process.returncode is None]
            for process in running:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)


def _run(argv: list[str]) -> tuple[list[str], int, str]:
    """One compiler process outside a build (tests/cuda_emulation.py): exit status and output."""
    with CompilerProcesses() as processes:
        return processes.run(argv)


# ---- failed compiles: remembered when the sources failed, not when the machine did ----------------

# Compiler output that tells of the machine, not of the sources: a full disk or quota, exhausted
# memory (gcc's "Killed signal terminated program cc1plus" is the OOM killer's work), a compiler
# stage killed by a signal (nvcc's "died due to signal", clang's "failed due to signal").
MACHINE_FAILURES = re.compile(
    r"No space left on device|Disk quota exceeded|Cannot allocate memory|out of memory allocating|"
    r"virtual memory exhausted|Killed signal terminated program|internal compiler error: Killed|due to signal|"
    r"Resource temporarily unavailable",
    re.IGNORECASE,
)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _killed_by(returncode: int) -> int | None:
    """The signal that killed a compiler: the guard reports it as 128 + N (a wrapper script too)."""
    if returncode < 0:
        return -returncode
    return returncode - 128 if returncode - 128 in signal.valid_signals() else None


def machine_failure(returncode: int, output: str) -> str | None:
    """Why a failed command says nothing about the sources, so that the same compile may well
    succeed later (it was killed, could not start, or ran out of disk or memory); None when the
    compiler ran to its end and reported an error."""
    killed = _killed_by(returncode)
    if killed is not None:
        return f"killed by {_signal_name(killed)}"
    if returncode in (126, 127):
        return "the compiler could not be started"
    found = MACHINE_FAILURES.search(output)
    return f"'{found.group(0)}'" if found else None


class CompileFailed(BuildError):
    """A compile that ran and failed. `machine_failure` says why it is not remembered (a killed
    compiler, a full disk, ...), or is None for a failure of the sources, which is."""

    def __init__(self, message: str, machine_failure: str | None):
        super().__init__(message)
        self.machine_failure = machine_failure


def _compile_failed(lib: Library, failed: list[tuple[list[str], int, str]], log_path: Path) -> CompileFailed:
    """The error of a compile whose commands `failed`: what the first said, and whether the machine
    failed (any command's failure from the machine makes the whole compile's unreliable)."""
    argv, returncode, output = failed[0]
    killed = _killed_by(returncode)
    said = f"was killed by {_signal_name(killed)}" if killed is not None else f"said: {_first_error(output)}"
    message = f"compiling the native {lib.kind} kernels failed: `{Path(argv[0]).name}` {said} (full log: {log_path})"
    why = next(filter(None, (machine_failure(rc, out) for _, rc, out in failed)), None)
    if why is not None:
        message += f"; not remembered, as the machine failed ({why}), not the sources: a new process compiles again"
    return CompileFailed(message, why)


def compiler_identity(lib: Library) -> list:
    """The compilers' paths, sizes and modification times. The cache folder's name holds their
    paths only: a compiler upgraded in place makes a remembered failure stale."""
    identity = []
    for path in filter(None, (lib.cxx, lib.nvcc)):
        try:
            stat = os.stat(path)
            identity.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            identity.append([path, None, None])
    return identity


def remember_failure(mark: Path, lib: Library, reason: str) -> None:
    with contextlib.suppress(OSError):  # a mark that cannot be written (a full disk) is just not there
        mark.write_text(json.dumps({"reason": reason, "compilers": compiler_identity(lib)}))


def remembered_failure(mark: Path, lib: Library) -> str | None:
    """The reason of an earlier compile of these sources that failed on them, or None: no mark, a
    mark made with compilers that have changed since, or one from an older crl-ops (its reason
    only: it may have come from a killed compile)."""
    try:
        recorded = json.loads(mark.read_text())
        reason, compilers = recorded["reason"], recorded["compilers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return reason if compilers == compiler_identity(lib) else None


def _first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[0][:300]


def compile_library(lib: Library, directory: Path) -> float:
    """Compiles `lib` into directory/lib<name>.so (built aside, then renamed into place) with the
    full log in directory/build.log; returns the seconds it took. The caller holds the lock."""
    start = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix="tmp-build-", dir=directory))
    log_path = directory / BUILD_LOG
    target = build / f"lib{lib.name}.so"
    include = _include_flags(lib.part)
    commands = []
    for index, source in enumerate(lib.sources):
        obj = str(build / f"{index}-{Path(source).stem}.o")
        if source.endswith(".cu"):
            commands.append([lib.nvcc, "-c", source, "-o", obj, *lib.nvcc_flags, *include])
        else:
            commands.append([lib.cxx, "-c", source, "-o", obj, *lib.cxx_flags, *include])
    objects = [argv[argv.index("-o") + 1] for argv in commands]
    link = [lib.cxx, "-shared", "-o", str(target), *objects, *lib.link_flags, *_link_libraries(lib.part)]
    jobs = max_jobs()
    # The compilers' temporary files go in the build folder, removed below or by the next compile.
    environment = dict(os.environ, TMPDIR=str(build))
    try:
        with open(log_path, "w") as log:
            # The processes' block is left first: an exception kills the compilers, then the pool ends.
            with ThreadPoolExecutor(max(1, min(jobs, len(commands)))) as pool, \
                    CompilerProcesses(environment) as processes:
                results = list(pool.map(processes.run, commands))
                if all(rc == 0 for _, rc, _ in results):
                    results.append(processes.run(link))
            for argv, rc, output in results:
                log.write(f"$ {shlex.join(argv)}\n{output}{'' if rc == 0 else f'[exit status {rc}]'}\n")
        failed = [result for result in results if result[1] != 0]
        if failed:
            raise _compile_failed(lib, failed, log_path)
        # The digest goes in place first: a library with no digest, or another one, is never loaded.
        digest = build / f"{target.name}{DIGEST_SUFFIX}"
        digest.write_text(_fingerprint(target))
        os.replace(digest, directory / digest.name)
        os.replace(target, directory / target.name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return time.monotonic() - start


# ---- what is loaded: a cut or partly overwritten library would crash the process in dlopen --------


def _fingerprint(path: Path) -> str:
    """A library's size and BLAKE2b digest, one line."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stat().st_size} {digest.hexdigest()}"


def damage(path: Path) -> str | None:
    """Why the compiled library at `path` must not be loaded (no digest, or its size or bytes
    differ from the digest written when its build ended), or None."""
    digest = path.with_name(path.name + DIGEST_SUFFIX)
    try:
        recorded = digest.read_text().strip()
    except OSError:
        return f"it has no digest ({digest.name}): its build did not finish"
    found = _fingerprint(path)
    if found == recorded:
        return None
    size, recorded_size = found.split()[0], recorded.split()[0]
    return f"its size is {size} bytes, {recorded_size} when it was built" if size != recorded_size else \
        "its bytes differ from those it was built with"


def elf_damage(path: Path) -> str | None:
    """Why the shared library at `path` is cut short (its ELF headers place data past its end), or None.
    For the prebuilt extension, which has no digest: a truncated copy is found before dlopen maps it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
                return None  # not a 64-bit ELF file: the loader's own error says what it is
            endian = "<" if header[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(endian + "QQ", header, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(endian + "HHHH", header, 54)
            if shoff + shnum * shentsize > size or phoff + phnum * phentsize > size:
                return f"its headers reach past its {size} bytes"
            handle.seek(phoff)
            for _ in range(phnum):
                entry = handle.read(phentsize)
                offset, filesz = struct.unpack_from(endian + "Q", entry, 8)[0], struct.unpack_from(endian + "Q", entry, 32)[0]
                if offset + filesz > size:
                    return f"a segment reaches past its {size} bytes"
    except (OSError, struct.error) as error:
        return f"it cannot be read ({error})"
    return None


# ---- the environment variables crl-ops reads: each value checked, each error naming its variable ----

NATIVE_OFF = ("0", "false", "off", "no")
NATIVE_ON = ("", "1", "true", "on", "yes")


def native_disabled() -> bool:
    """Whether CRL_OPS_NATIVE turns the native kernels off (0, false, off or no, in any case)."""
    value = os.environ.get("CRL_OPS_NATIVE", "")
    if value.strip().lower() in NATIVE_OFF:
        return True
    if value.strip().lower() in NATIVE_ON:
        return False
    raise BuildError(f"CRL_OPS_NATIVE={value!r}: expected 0, false, off or no (the native kernels off), "
                     f"or 1, true, on or yes")


def max_jobs() -> int:
    """MAX_JOBS, the parallel compiles (default: the CPU count)."""
    value = os.environ.get("MAX_JOBS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise BuildError(f"MAX_JOBS={value!r}: expected a whole number of parallel compiles, at least 1")
    return int(value)


def lock_timeout() -> float:
    """CRL_OPS_LOCK_TIMEOUT, the seconds to wait for another process's compile."""
    value = os.environ.get("CRL_OPS_LOCK_TIMEOUT", "").strip()
    if not value:
        return LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):  # a NaN deadline would never pass
        raise BuildError(f"CRL_OPS_LOCK_TIMEOUT={value!r}: expected a number of seconds, finite and at least 0")
    return seconds


@contextlib.contextmanager
def locked(path: Path, timeout: float, poll_s: float = 0.5):
    """An exclusive flock on `path`, waiting at most `timeout` seconds. The kernel drops the lock
    when its holder dies, so a killed compile never leaves a stale one."""
    try:
        import fcntl
    except ImportError:
        raise BuildError("compiling the native kernels on first use needs Linux or macOS") from None
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BuildError(
                        f"gave up after {timeout:.0f} s waiting for another process that compiles the native kernels "
                        f"(lock {path}); let it finish, or raise CRL_OPS_LOCK_TIMEOUT"
                    ) from None
                if not waited:
                    logger.warning("crl_ops: waiting for another process compiling the native kernels (lock %s)", path)
                    waited = True
                time.sleep(min(poll_s, remaining))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(path: Path | str) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        raise BuildError(f"could not load {path}: {error}") from None


def cached(lib: Library, retry: bool = False) -> tuple[Path, float | None]:
    """Loads `lib` from the cache, compiling it first when it is not there or is damaged (once,
    under the lock). Returns its path and the compile seconds (None when it was cached)."""
    directory = cache_root() / "crl_ops" / f"{lib.part}-{lib.key()}"
    path = directory / f"lib{lib.name}.so"
    try:
        seconds = None if path.exists() and damage(path) is None else _compile_once(lib, directory, path, retry)
    except OSError as error:  # e.g. a read-only home directory
        raise BuildError(f"cannot compile into {directory} ({error}); set TORCH_EXTENSIONS_DIR to a writable folder") from None
    _load(path)
    return path, seconds


def _compile_once(lib: Library, directory: Path, path: Path, retry: bool) -> float | None:
    """Compiles `lib` unless another process did while this one waited for the lock."""
    timeout = lock_timeout()
    max_jobs()  # a bad value is said now, not recorded as a failed compile
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory / "lock", timeout):
        if path.exists():
            why = damage(path)
            if why is None:
                return None
            logger.warning("crl_ops: not loading %s: %s; compiling it again", path, why)
            path.unlink()
        failed = directory / FAILED_MARK
        remembered = remembered_failure(failed, lib)
        if remembered is not None and not retry:
            raise BuildError(f"{remembered}; to try again, delete {directory} or run `python -m crl_ops.build`")
        failed.unlink(missing_ok=True)  # this compile's outcome replaces it
        for stale in directory.glob("tmp-build-*"):  # left by a killed compile; none is running (the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if lib.nvcc:
            _check_nvcc_version(lib.nvcc)
        logger.warning(
            "crl_ops: compiling the native %s kernels for torch %s into %s (%s, once per torch version)",
            lib.kind, torch.__version__, directory, EXPECTED_DURATION[lib.part],
        )
        try:
            seconds = compile_library(lib, directory)
        except CompileFailed as error:
            if error.machine_failure is None:
                remember_failure(failed, lib, str(error))
            raise
        logger.warning("crl_ops: compiled the native %s kernels in %.0f s", lib.kind, seconds)
        return seconds


def registered(device_type: str) -> bool | None:
    """Whether kernels for the device type are registered; None when the op schemas are not."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(PROBE_OP, DISPATCH_KEYS[device_type])
    except RuntimeError:  # "operator crl_ops::profile does not exist"
        return None


ORIGINS: dict[str, str] = {}  # device type -> where its kernels came from, for `python -m crl_ops.build`
_FAILURES: dict[str, str] = {}  # device type -> why not, so that a failure costs its time once per process
_MUTEX = threading.Lock()


def _note_origin(origin: str) -> None:
    for device_type in DISPATCH_KEYS:
        if device_type not in ORIGINS and registered(device_type):
            ORIGINS[device_type] = origin


def _loaded_before() -> str:
    """Where kernels registered before ensure() looked came from (crl_ops._native may load them)."""
    if os.environ.get("CRL_OPS_LIBRARY"):
        return f"CRL_OPS_LIBRARY={os.environ['CRL_OPS_LIBRARY']}"
    prebuilt = sys.modules.get("crl_ops._C")
    return f"the prebuilt extension {prebuilt.__file__}" if prebuilt else f"one of {sorted(torch.ops.loaded_libraries)}"


def _register(device_type: str, retry: bool) -> None:
    library_path = os.environ.get("CRL_OPS_LIBRARY")
    if library_path:  # the user's choice: used alone, never mixed with other builds
        _load(library_path)
        _note_origin(f"CRL_OPS_LIBRARY={library_path}")
        if not registered(device_type):
            raise BuildError(f"CRL_OPS_LIBRARY={library_path} has no {DISPATCH_KEYS[device_type]} kernels")
        return
    spec = importlib.util.find_spec("crl_ops._C")
    why = elf_damage(Path(spec.origin)) if spec is not None and spec.origin else None
    if why is not None:
        logger.warning("crl_ops: not loading the prebuilt extension %s: %s", spec.origin, why)
    else:
        try:
            prebuilt = importlib.import_module("crl_ops._C")
            _note_origin(f"the prebuilt extension {prebuilt.__file__}")
        except ImportError as error:  # not built, or built against another torch
            logger.debug("crl_ops: no usable prebuilt extension crl_ops._C (%s)", error)
    if registered(device_type):
        return
    parts = (["cpu"] if registered("cpu") is None else []) + (["cuda"] if device_type == "cuda" else [])
    libraries = [library(part) for part in parts]  # all that is missing (nvcc, ...) is said before compiling
    for lib in libraries:
        path, seconds = cached(lib, retry)
        _note_origin(f"{path} ({'cached' if seconds is None else f'compiled in {seconds:.0f} s'})")
    if not registered(device_type):
        raise BuildError(f"the compiled libraries registered no {DISPATCH_KEYS[device_type]} kernels")


def ensure(device_type: str, retry: bool = False) -> str | None:
    """Makes the native kernels for `device_type` ('cpu' or 'cuda') registered in this process.
    Tries, in order: CRL_OPS_LIBRARY (a CMake-built libcrl_ops.so), the prebuilt extension
    crl_ops._C, a library already compiled into the cache, and compiling the shipped sources into
    the cache (once, under the lock). Returns None when the kernels for that device type are
    registered, else one sentence saying why not and how to get them. `retry` compiles again
    where an earlier compile of the same sources failed."""
    if device_type not in DISPATCH_KEYS:
        return f"crl_ops has native kernels for {sorted(DISPATCH_KEYS)} only, not {device_type!r}"
    try:
        if native_disabled():
            return f"the native kernels are disabled by CRL_OPS_NATIVE={os.environ['CRL_OPS_NATIVE']}"
    except BuildError as error:
        return str(error)
    with _MUTEX:
        if registered(device_type):
            _note_origin(_loaded_before())
            return None
        if device_type in _FAILURES and not retry:
            return _FAILURES[device_type]
        try:
            _register(device_type, retry)
        except BuildError as error:
            _FAILURES[device_type] = str(error)
            return str(error)
        _FAILURES.pop(device_type, None)
        return None
