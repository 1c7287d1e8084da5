"""crl_ops._build: compiling the shipped sources into torch's extension cache on first use.

No test here runs a real compiler (fake ones stand in, and nothing compiled is loaded into this
process, which has the schemas already): tools/check_install.sh compiles and runs the kernels
from a plain `pip install` in a fresh environment."""
import contextlib
import dataclasses
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from crl_ops import _build
from crl_ops._build import BuildError

@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty extension cache, no CRL_OPS_* settings, and no failure remembered from elsewhere."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    for name in ("CRL_OPS_NATIVE", "CRL_OPS_LIBRARY", "CRL_OPS_LOCK_TIMEOUT", "MAX_JOBS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_build, "_FAILURES", {})
    return tmp_path / "torch_extensions"


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """CXX is a script that logs each call to calls.txt and fails like a compiler."""
    return _failing_compiler(tmp_path, monkeypatch, "echo 'fake.cpp:1:1: error: no OpenMP here'\nexit 1")


@pytest.fixture
def unbuilt(monkeypatch):
    """This process as if it had no kernels at all: no schemas registered, no crl_ops._C."""
    import_module = _build.importlib.import_module

    def no_prebuilt(name, *args):
        if name == "crl_ops._C":
            raise ImportError("no module named crl_ops._C")
        return import_module(name, *args)

    monkeypatch.setattr(_build, "registered", lambda device_type: None)
    monkeypatch.setattr(_build.importlib, "import_module", no_prebuilt)


# ---- sources and the cache key -----------------------------------------------------------------


def test_sources_are_globbed(tmp_path):
    for name in ("ops.cpp", "autograd.cpp", "python_module.cpp", "cpu/a.cpp", "cpu/b.cpp", "cuda/k.cu", "cuda/r.cpp", "cuda/k.h"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    names = lambda paths: [os.path.relpath(p, tmp_path) for p in paths]  # noqa: E731
    assert names(_build.core_sources(tmp_path)) == ["autograd.cpp", "ops.cpp", "cpu/a.cpp", "cpu/b.cpp"]
    assert names(_build.cuda_sources(tmp_path)) == ["cuda/k.cu", "cuda/r.cpp"]


def test_cxx_standard_is_the_one_torch_headers_require():
    # torch 2.14's c10 headers use C++20 (std::strong_ordering); compiling them as C++17 fails.
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    assert _build.cxx_standard_flag() == ("-std=c++20" if version >= (2, 14) else "-std=c++17")


def _key_with(monkeypatch, tmp_path, change):
    """The CPU library's key after `change(monkeypatch, tmp_path, lib)` -> lib, on a copy of the sources."""
    source_dir = tmp_path / "csrc"
    if not source_dir.exists():
        subprocess.run(["cp", "-r", str(_build.SOURCE_DIR), str(source_dir)], check=True)
    monkeypatch.setattr(_build, "SOURCE_DIR", source_dir)
    lib = _build.Library("cpu", tuple(_build.core_sources(source_dir)), "/usr/bin/g++", None, ("-O3",), (), ("-fopenmp",))
    with monkeypatch.context() as patch:
        lib = change(patch, source_dir, lib) or lib
        return lib.key()


def _append(path):
    with open(path, "a") as handle:
        handle.write("\n// changed\n")


KEY_INPUTS = {
    "crl_ops version": lambda mp, src, lib: mp.setattr(_build, "package_version", lambda: "9.9.9"),
    "torch version": lambda mp, src, lib: mp.setattr(torch, "__version__", "0.0.1"),
    "torch CUDA version": lambda mp, src, lib: mp.setattr(torch.version, "cuda", "99.0"),
    "a source file": lambda mp, src, lib: _append(lib.sources[-1]),
    "a header": lambda mp, src, lib: _append(src / "common" / "crl_math.h"),
    "the compiler": lambda mp, src, lib: dataclasses.replace(lib, cxx="/usr/bin/clang++"),
    "the C++ flags": lambda mp, src, lib: dataclasses.replace(lib, cxx_flags=("-O2",)),
    "the link flags": lambda mp, src, lib: dataclasses.replace(lib, link_flags=()),
    "the CUDA architectures": lambda mp, src, lib: dataclasses.replace(lib, nvcc_flags=("-gencode=arch=compute_80,code=sm_80",)),
}


@pytest.mark.parametrize("change", KEY_INPUTS.values(), ids=KEY_INPUTS.keys())
def test_cache_key_changes_with_each_input(monkeypatch, tmp_path, change):
    unchanged = _key_with(monkeypatch, tmp_path, lambda mp, src, lib: None)
    assert _key_with(monkeypatch, tmp_path, lambda mp, src, lib: None) == unchanged
    assert _key_with(monkeypatch, tmp_path, change) != unchanged


def test_arch_list_comes_from_torch_cuda_arch_list(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert _build._cuda_arch_flags() == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "4.2")
    with pytest.raises(BuildError, match="TORCH_CUDA_ARCH_LIST='4.2'"):
        _build._cuda_arch_flags()


def test_cache_folder_is_under_torch_extensions_dir(cache):
    assert _build.cache_root() == cache


# ---- the lock ----------------------------------------------------------------------------------


def test_lock_timeout_gives_a_reason_and_does_not_hang(tmp_path):
    path = tmp_path / "lock"
    with _build.locked(path, timeout=5):
        start = time.monotonic()
        with pytest.raises(BuildError, match="gave up after 0 s waiting for another process .* CRL_OPS_LOCK_TIMEOUT"):
            with _build.locked(path, timeout=0.3, poll_s=0.05):
                pass
        assert time.monotonic() - start < 3
    with _build.locked(path, timeout=0.3):  # free again once its holder is done
        pass


def test_waiter_gets_the_lock_when_the_holder_releases_it(tmp_path):
    path = tmp_path / "lock"
    order = []

    def wait_for_lock():
        with _build.locked(path, timeout=10, poll_s=0.05):
            order.append("waiter")

    with _build.locked(path, timeout=5):
        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        time.sleep(0.3)
        order.append("holder done")
    waiter.join(10)
    assert order == ["holder done", "waiter"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, sys, time; f = open({str(path)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BuildError, match="gave up"):
            with _build.locked(path, timeout=0.2, poll_s=0.05):
                pass
    finally:
        holder.kill()
        holder.wait()
    with _build.locked(path, timeout=5):
        with open(path) as handle:  # held by this process now: a second description cannot take it
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_compile_waits_for_the_lock_then_gives_a_reason(cache, fake_compiler, monkeypatch):
    monkeypatch.setenv("CRL_OPS_LOCK_TIMEOUT", "0.2")
    lib = _build.library("cpu")
    directory = cache / "crl_ops" / f"cpu-{lib.key()}"
    directory.mkdir(parents=True)
    with _build.locked(directory / "lock", timeout=5):
        with pytest.raises(BuildError, match=f"lock {directory / 'lock'}"):
            _build.cached(lib)
    assert not fake_compiler.exists()  # it never ran: another process held the lock


# ---- failures are reasons ----------------------------------------------------------------------


def test_failing_compiler_gives_a_reason_naming_the_log(cache, fake_compiler, unbuilt):
    reason = _build.ensure("cpu")
    log = next(cache.glob("crl_ops/cpu-*/build.log"))
    assert reason.startswith("compiling the native CPU kernels failed")
    assert "fake.cpp:1:1: error: no OpenMP here" in reason and f"full log: {log}" in reason
    assert "error: no OpenMP here" in log.read_text() and "-ffp-contract=off" in log.read_text()
    assert not list(cache.glob("crl_ops/cpu-*/*.so")) and not list(cache.glob("crl_ops/cpu-*/tmp-build-*"))
    calls = len(fake_compiler.read_text().splitlines())
    assert calls == len(_build.core_sources())  # every translation unit, no link after a failure


def test_failed_compile_is_not_retried_on_every_use(cache, fake_compiler, unbuilt, monkeypatch):
    first = _build.ensure("cpu")
    assert _build.ensure("cpu") == first  # this process remembers
    monkeypatch.setattr(_build, "_FAILURES", {})
    again = _build.ensure("cpu")  # a new process reads the mark in the cache folder
    assert "to try again, delete" in again and "python -m crl_ops.build" in again
    calls = len(fake_compiler.read_text().splitlines())
    assert calls == len(_build.core_sources())
    _build.ensure("cpu", retry=True)
    assert len(fake_compiler.read_text().splitlines()) == 2 * calls


def _failing_compiler(tmp_path, monkeypatch, failure: str) -> Path:
    """CXX is a script that logs each call to calls.txt, then runs the shell line `failure`."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "failing-c++"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{failure}\n')
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    return calls


MACHINE_FAILURES = {
    "killed by a signal": "kill -KILL $$",
    "a wrapper whose compiler was killed": "exit 143",
    "a full disk": "echo 'fatal error: error writing to /tmp/ccQ.s: No space left on device'; exit 1",
    "the OOM killer": "echo 'g++: fatal error: Killed signal terminated program cc1plus'; exit 1",
    "a compiler that cannot start": "exit 126",
}


@pytest.mark.parametrize("failure", MACHINE_FAILURES.values(), ids=MACHINE_FAILURES.keys())
def test_a_failure_of_the_machine_is_not_remembered(cache, unbuilt, tmp_path, monkeypatch, failure):
    """A killed compiler, a full disk or exhausted memory says nothing about the sources: the next
    process compiles again, with no folder to delete."""
    calls = _failing_compiler(tmp_path, monkeypatch, failure)
    reason = _build.ensure("cpu")
    assert reason.startswith("compiling the native CPU kernels failed") and "full log:" in reason, reason
    assert "not remembered, as the machine failed" in reason and "a new process compiles again" in reason
    assert not list(cache.rglob(_build.FAILED_MARK))
    first = len(calls.read_text().splitlines())
    monkeypatch.setattr(_build, "_FAILURES", {})  # a new process
    assert "to try again, delete" not in _build.ensure("cpu")
    assert len(calls.read_text().splitlines()) == 2 * first


def test_a_killed_compiler_is_named_with_its_signal(cache, unbuilt, tmp_path, monkeypatch):
    _failing_compiler(tmp_path, monkeypatch, "kill -TERM $$")
    assert "`failing-c++` was killed by SIGTERM (full log:" in _build.ensure("cpu")


def _touch_compiler(mark, compiler):
    mtime = compiler.stat().st_mtime_ns + 10**9
    os.utime(compiler, ns=(mtime, mtime))


STALE_MARKS = {
    "the compiler changed since": _touch_compiler,
    "a mark of an older crl-ops": lambda mark, compiler: mark.write_text("compiling the native CPU kernels failed: ..."),
}


@pytest.mark.parametrize("make_stale", STALE_MARKS.values(), ids=STALE_MARKS.keys())
def test_a_stale_failure_mark_is_compiled_again(cache, fake_compiler, unbuilt, monkeypatch, make_stale):
    """The cache folder's name holds the compiler's path, not its contents: a failure is remembered
    with the compilers' sizes and times, and forgotten when one is upgraded in place. A mark in the
    older plain-text form may come from a killed compile: it is compiled again once."""
    _build.ensure("cpu")
    mark = next(cache.rglob(_build.FAILED_MARK))
    make_stale(mark, Path(os.environ["CXX"]))
    monkeypatch.setattr(_build, "_FAILURES", {})  # a new process
    again = _build.ensure("cpu")
    assert again.startswith("compiling the native CPU kernels failed") and "to try again, delete" not in again
    calls = len(fake_compiler.read_text().splitlines())
    assert calls == 2 * len(_build.core_sources())
    monkeypatch.setattr(_build, "_FAILURES", {})  # remembered again, with the compiler as it is now
    assert "to try again, delete" in _build.ensure("cpu")
    assert len(fake_compiler.read_text().splitlines()) == calls


def test_a_full_disk_before_compiling_is_not_remembered(cache, fake_compiler, unbuilt, monkeypatch):
    def no_space(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_build.tempfile, "mkdtemp", no_space)
    reason = _build.ensure("cpu")
    assert reason.startswith("cannot compile into") and "No space left on device" in reason, reason
    assert not list(cache.rglob(_build.FAILED_MARK))


def test_missing_compiler_gives_a_reason(cache, unbuilt, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-crl")
    assert _build.ensure("cpu") == "no C++ compiler: `no-such-compiler-crl` is not on PATH (install g++ or set CXX)"


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no", " False "])
def test_crl_ops_native_false_values_disable(cache, monkeypatch, value):
    monkeypatch.setenv("CRL_OPS_NATIVE", value)
    assert _build.ensure("cpu") == f"the native kernels are disabled by CRL_OPS_NATIVE={value}"


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes", ""])
def test_crl_ops_native_true_values_enable(cache, monkeypatch, value):
    monkeypatch.setenv("CRL_OPS_NATIVE", value)
    assert not _build.native_disabled()


@pytest.mark.parametrize("name, value, expected", [
    ("CRL_OPS_NATIVE", "maybe", "CRL_OPS_NATIVE='maybe': expected 0, false, off or no"),
    ("CRL_OPS_LOCK_TIMEOUT", "nan", "CRL_OPS_LOCK_TIMEOUT='nan': expected a number of seconds, finite and at least 0"),
    ("CRL_OPS_LOCK_TIMEOUT", "abc", "CRL_OPS_LOCK_TIMEOUT='abc': expected a number of seconds"),
    ("CRL_OPS_LOCK_TIMEOUT", "-1", "CRL_OPS_LOCK_TIMEOUT='-1': expected a number of seconds"),
    ("CRL_OPS_LOCK_TIMEOUT", "inf", "CRL_OPS_LOCK_TIMEOUT='inf': expected a number of seconds"),
    ("MAX_JOBS", "abc", "MAX_JOBS='abc': expected a whole number of parallel compiles, at least 1"),
    ("MAX_JOBS", "0", "MAX_JOBS='0': expected a whole number"),
])
def test_bad_environment_values_name_their_variable(cache, unbuilt, fake_compiler, monkeypatch, name, value, expected):
    """A bad value is the reason the kernels are unavailable, said before anything compiles and
    not remembered as a failed compile."""
    monkeypatch.setenv(name, value)
    reason = _build.ensure("cpu")
    assert reason is not None and expected in reason, reason
    assert not fake_compiler.exists(), "nothing was compiled"
    assert not list(cache.rglob(_build.FAILED_MARK))


def test_unknown_device_type_gives_a_reason():
    assert "'cpu', 'cuda'" in _build.ensure("mps")


def test_unloadable_crl_ops_library_gives_a_reason(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CRL_OPS_LIBRARY", str(tmp_path / "libmissing.so"))
    monkeypatch.setattr(_build, "registered", lambda device_type: False)
    assert _build.ensure("cpu").startswith(f"could not load {tmp_path / 'libmissing.so'}")


def test_cuda_needs_a_cuda_build_of_torch(cache, unbuilt, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _build.ensure("cuda") == f"torch {torch.__version__} is built without CUDA"


def test_cuda_needs_nvcc(cache, unbuilt, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no bin/nvcc there
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(_build, "_cxx", lambda: "/usr/bin/g++")  # found before PATH changed
    assert _build.ensure("cuda").startswith("the CUDA kernels need nvcc (CUDA 13.0, as torch)")


# ---- compiling into the cache (with a compiler that only writes its outputs) --------------------


@pytest.fixture
def writing_compiler(tmp_path, monkeypatch):
    """CXX writes an empty file for -o and logs each call; loading is recorded instead of done."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "writing-c++"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        'while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then : > "$2"; fi; shift; done\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    loaded = []
    monkeypatch.setattr(_build, "_load", loaded.append)
    return calls, loaded


def test_compiles_once_into_the_cache_then_loads_from_it(cache, writing_compiler, caplog):
    calls, loaded = writing_compiler
    lib = _build.library("cpu")
    with caplog.at_level("WARNING", logger="crl_ops"):
        path, seconds = _build.cached(lib)
    assert path == cache / "crl_ops" / f"cpu-{lib.key()}" / "libcrl_ops_cpu.so" and path.exists()
    assert seconds is not None and loaded == [path]
    assert [record.getMessage().split(" into ")[0] for record in caplog.records] == [
        f"crl_ops: compiling the native CPU kernels for torch {torch.__version__}"
    ] + [f"crl_ops: compiled the native CPU kernels in {seconds:.0f} s"]
    assert len(calls.read_text().splitlines()) == len(lib.sources) + 1  # one process per file, then the link
    assert sorted(p.name for p in path.parent.iterdir()) == ["build.log", "libcrl_ops_cpu.so", "libcrl_ops_cpu.so.digest",
                                                         "lock"]  # no temporary left
    caplog.clear()
    assert _build.cached(lib) == (path, None)  # a later process: no compile, no log line
    assert loaded == [path, path] and not caplog.records
    assert len(calls.read_text().splitlines()) == len(lib.sources) + 1


def test_a_killed_compile_leaves_nothing_that_is_loaded(cache, writing_compiler):
    calls, loaded = writing_compiler
    lib = _build.library("cpu")
    directory = cache / "crl_ops" / f"cpu-{lib.key()}"
    (directory / "tmp-build-killed").mkdir(parents=True)
    (directory / "tmp-build-killed" / "libcrl_ops_cpu.so").write_text("half written")
    path, _ = _build.cached(lib)
    assert loaded == [path] and path.read_text() == ""  # the fresh build, not the half-written one
    assert not list(directory.glob("tmp-build-*"))


def test_ensure_compiles_the_core_library_where_there_are_no_schemas(cache, writing_compiler, unbuilt):
    calls, loaded = writing_compiler
    # The fake library registers nothing, which ensure() must say rather than report success.
    assert _build.ensure("cpu") == "the compiled libraries registered no CPU kernels"
    assert loaded == [next(cache.glob("crl_ops/cpu-*/libcrl_ops_cpu.so"))]


THREADED_FIRST_USE = """
import threading
import torch
import crl_ops

errors = []
barrier = threading.Barrier(8)

def first_call():
    barrier.wait()
    try:
        features = torch.empty(16, 2, 4, device="meta")
        logits = torch.empty(16, 2, device="meta")
        labels = torch.empty(16, 2, dtype=torch.long, device="meta")
        crl_ops.CRL(backend="native", validate=False)(features, logits, labels)
    except Exception as error:
        errors.append(repr(error))

threads = [threading.Thread(target=first_call) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("ERRORS", errors)
"""


def test_threaded_first_use_with_meta_tensors():
    """Eight threads whose first call is at once, on meta tensors: each finds the fake kernels
    registered (crl_ops._native publishes a device type's answer after them)."""
    for _ in range(3):
        process = subprocess.run([sys.executable, "-c", THREADED_FIRST_USE], capture_output=True, text=True,
                                 timeout=300)
        assert process.returncode == 0 and "ERRORS []" in process.stdout, process.stdout + process.stderr[-3000:]


# ---- no compiler outlives the process that started it ---------------------------------------------


@pytest.fixture
def sleeping_compiler(tmp_path, monkeypatch):
    """CXX starts a process that sleeps 60 s (as g++ starts cc1plus), writes its own pid and that
    process's to pids.txt, and waits for it. Returns (pids.txt, the script)."""
    pids = tmp_path / "pids.txt"
    script = tmp_path / "sleeping-c++"
    script.write_text(f'#!/bin/sh\nsleep 60 &\necho "$$ $!" >> {pids}\nwait\n')
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    return pids, script


def _alive(pid: int) -> bool:
    """Whether the process runs: a zombie (dead, not yet reaped by its new parent) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _started_compilers(pids_file: Path, count: int, timeout: float = 60) -> list[int]:
    """The pids of the first `count` compilers and of the processes they started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = pids_file.read_text().splitlines() if pids_file.exists() else []
        if len(lines) >= count:
            return [int(pid) for line in lines for pid in line.split()]
        time.sleep(0.05)
    raise AssertionError(f"{count} compilers did not start within {timeout} s")


def _still_alive_after(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


def _kill_leftovers(pids_file: Path) -> None:
    """Ends what a failing test left running: only the processes its fake compilers recorded."""
    for line in pids_file.read_text().splitlines() if pids_file.exists() else []:
        for pid in map(int, line.split()):
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


BUILD_IN_A_CHILD = """
import sys
from pathlib import Path
from crl_ops import _build
_build.compile_library(_build.library("cpu"), Path(sys.argv[1]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("stop", ["SIGKILL", "KeyboardInterrupt"])
def test_compilers_end_with_the_process_that_started_them(tmp_path, sleeping_compiler, monkeypatch, stop):
    """A build killed by SIGKILL, or interrupted by Ctrl-C, leaves no compiler running, nor what
    the compilers started; the interrupted one does not wait for them and removes its build folder."""
    pids_file, _ = sleeping_compiler
    monkeypatch.setenv("MAX_JOBS", "2")
    directory = tmp_path / "cache-folder"
    directory.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    builder = subprocess.Popen([sys.executable, "-c", BUILD_IN_A_CHILD, str(directory)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pids = _started_compilers(pids_file, 2)
        if stop == "SIGKILL":
            builder.kill()
            builder.wait(10)
        else:
            builder.send_signal(signal.SIGINT)
            _, stderr = builder.communicate(timeout=10)
            assert "KeyboardInterrupt" in stderr, stderr[-3000:]
            assert not list(directory.glob("tmp-build-*"))
        assert _still_alive_after(pids, 5) == []
        assert len(pids_file.read_text().splitlines()) == 2, "no compile started after the stop"
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait()
        _kill_leftovers(pids_file)


def test_an_exception_while_compiling_kills_the_compilers(sleeping_compiler):
    pids_file, script = sleeping_compiler
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            with ThreadPoolExecutor(2) as pool, _build.CompilerProcesses() as processes:
                runs = [pool.submit(processes.run, [str(script)]) for _ in range(3)]
                pids = _started_compilers(pids_file, 2)
                raise RuntimeError("stop here")
        assert time.monotonic() - start < 10, "the exception waited for the compiles"
        assert _still_alive_after(pids, 5) == []
        argv, status, output = runs[2].result()
        assert status != 0 and output == "not started: the build was interrupted"
    finally:
        _kill_leftovers(pids_file)


def test_the_compilers_temporary_files_go_in_the_build_folder(cache, tmp_path, monkeypatch):
    """What a killed compiler leaves (gcc's /tmp/cc*.s) is removed with the build folder."""
    folders = tmp_path / "tmpdirs.txt"
    script = tmp_path / "tmpdir-c++"
    script.write_text(f'#!/bin/sh\necho "$TMPDIR" >> {folders}\nexit 1\n')
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    lib = _build.library("cpu")
    directory = cache / "crl_ops" / f"cpu-{lib.key()}"
    directory.mkdir(parents=True)
    with pytest.raises(BuildError):
        _build.compile_library(lib, directory)
    used = set(folders.read_text().split())
    assert len(used) == 1 and Path(used.pop()).parent == directory
    assert not list(directory.glob("tmp-build-*"))


# ---- what is loaded is what was built ------------------------------------------------------------


@pytest.fixture
def cached_library(cache, fake_compiler, monkeypatch):
    """The "cpu" library as a build left it in the cache (a stand-in file and its digest); `_load`
    records instead of loading."""
    lib = _build.library("cpu")
    directory = cache / "crl_ops" / f"cpu-{lib.key()}"
    directory.mkdir(parents=True)
    path = directory / f"lib{lib.name}.so"
    path.write_bytes(bytes(range(256)) * 4096)
    (directory / (path.name + _build.DIGEST_SUFFIX)).write_text(_build._fingerprint(path))
    loaded = []
    monkeypatch.setattr(_build, "_load", lambda p: loaded.append(Path(p)))
    return lib, path, loaded


def test_intact_cached_library_is_loaded(cached_library, fake_compiler):
    lib, path, loaded = cached_library
    assert _build.cached(lib) == (path, None)
    assert loaded == [path] and not fake_compiler.exists()


@pytest.mark.parametrize("damage, reason", [
    ("cut", "its size is 4096 bytes, 1048576 when it was built"),
    ("zeroed", "its bytes differ from those it was built with"),
    ("no digest", "it has no digest"),
])
def test_damaged_cached_library_is_compiled_again(cached_library, fake_compiler, caplog, damage, reason):
    """A library cut short (an interrupted copy, a full disk), partly zeroed, or whose build never
    finished is never given to dlopen: a warning names it, and it is compiled again."""
    lib, path, loaded = cached_library
    data = bytearray(path.read_bytes())
    if damage == "cut":
        path.write_bytes(bytes(data[:4096]))
    elif damage == "zeroed":
        data[len(data) // 2: len(data) // 2 + 65536] = bytes(65536)
        path.write_bytes(bytes(data))
    else:
        path.with_name(path.name + _build.DIGEST_SUFFIX).unlink()
    with caplog.at_level("WARNING", logger="crl_ops"), pytest.raises(BuildError, match="compiling the native CPU kernels failed"):
        _build.cached(lib)
    assert not loaded
    assert fake_compiler.exists(), "it was compiled again"
    assert f"not loading {path}: {reason}" in caplog.text


def test_elf_damage_finds_a_cut_library(tmp_path):
    """The prebuilt extension has no digest: its ELF headers show a copy cut short."""
    library = Path(torch.__file__).parent / "lib" / "libc10.so"
    intact = tmp_path / "intact.so"
    shutil.copyfile(library, intact)
    assert _build.elf_damage(intact) is None
    for size in (4096, library.stat().st_size // 2):
        cut = tmp_path / f"cut-{size}.so"
        cut.write_bytes(intact.read_bytes()[:size])
        assert "past its" in _build.elf_damage(cut)
    text = tmp_path / "text.so"
    text.write_text("not a library")
    assert _build.elf_damage(text) is None  # dlopen's own error names it


def test_cut_prebuilt_extension_is_not_imported(cache, unbuilt, fake_compiler, tmp_path, monkeypatch, caplog):
    cut = tmp_path / "_C.so"
    cut.write_bytes((Path(torch.__file__).parent / "lib" / "libc10.so").read_bytes()[:4096])
    monkeypatch.setattr(_build.importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(cut)))
    imported = []
    monkeypatch.setattr(_build.importlib, "import_module", lambda name, *args: imported.append(name))
    with caplog.at_level("WARNING", logger="crl_ops"):
        reason = _build.ensure("cpu")
    assert imported == [] and f"not loading the prebuilt extension {cut}: its headers reach past" in caplog.text
    assert reason.startswith("compiling the native CPU kernels failed"), reason  # then the shipped sources
