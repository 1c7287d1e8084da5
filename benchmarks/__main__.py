"""python -m benchmarks [--full] [--device cpu|cuda] [--out DIR] [--budget-seconds N] [--impl ...] [--variants ...]

Times CRL's native kernels, its pure-PyTorch reference, a per-class loop implementation and
pytorch-metric-learning's losses side by side, and writes results.json, results.md and plots.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

import crl_ops

from . import floor, report
from .implementations import IMPLEMENTATIONS, VARIANTS, Variant
from .plan import build_plan
from .runner import Runner, Settings
from .timing import cpu_memory_supported

try:
    from tqdm import tqdm
except ImportError:  # a bare GPU check machine may lack it: print one line per case instead
    tqdm = None

# quick/full x cpu/cuda: time budget, longest single call, seconds per implementation and timing round
DEFAULTS = {
    ("quick", "cpu"): dict(budget_seconds=150, max_call_seconds=3, min_seconds=0.1),
    ("full", "cpu"): dict(budget_seconds=1500, max_call_seconds=20, min_seconds=0.3),
    ("quick", "cuda"): dict(budget_seconds=200, max_call_seconds=5, min_seconds=0.05),
    ("full", "cuda"): dict(budget_seconds=1200, max_call_seconds=30, min_seconds=0.2),
}
TRAINING_VARIANT = Variant("instance", "relative")  # the paper's best variant, CRL(I+R)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--full", action="store_true", help="all configs, every variant swept in B to 16384, "
                        "sweeps of A, D and K (default: a quick run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="output folder (default: benchmarks/results/tmp/<device>-<quick|full>)")
    parser.add_argument("--budget-seconds", type=float, help="stop measuring after this long and record the rest "
                        "as skipped (default: 150 quick / 1500 full on the CPU, 200 / 1200 on a GPU)")
    parser.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], default=[v.name for v in VARIANTS])
    parser.add_argument("--max-call-seconds", type=float, help="skip cases whose one forward + backward is "
                        "estimated to take longer")
    parser.add_argument("--min-seconds", type=float, help="least time spent timing each implementation per round")
    parser.add_argument("--memory-cap-gb", type=float, help="CPU: record cases estimated to need more as OOM "
                        "(default: half the memory available at the start)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", metavar="DIR", help="measure nothing: rewrite DIR/results.md and the "
                        "plots from DIR/results.json")
    return parser.parse_args(argv)


def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return revision or "unknown"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def metadata(device: torch.device) -> dict:
    total = None
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as meminfo:
            total = int(meminfo.readline().split()[1]) * 1024
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": total,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "crl_ops": crl_ops.__version__,
        "native_cpu": crl_ops.native_available("cpu"),
        "native_cuda": crl_ops.native_available("cuda"),
        "pml": _package_version("pytorch-metric-learning"),
        "git": _git_revision(),
    }


class _PrintedProgress:
    """tqdm's interface, as one printed line per finished case."""

    def __init__(self, total: int):
        self.total, self.done, self.text = total, 0, ""

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.text = text

    def update(self) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {self.text}", flush=True)

    def close(self) -> None:
        pass


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        with open(os.path.join(args.report_only, "results.json")) as f:
            print("wrote " + ", ".join(report.write(args.report_only, json.load(f))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    device = torch.device(args.device)
    machine = metadata(device)  # at the start: the date and revision of what is measured
    mode = "full" if args.full else "quick"
    defaults = DEFAULTS[(mode, device.type)]
    available = _available_memory_bytes()
    if args.memory_cap_gb is not None:
        cap = int(args.memory_cap_gb * 2**30)
    else:
        cap = available // 2 if available else None
    settings = Settings(
        device=device,
        budget_seconds=args.budget_seconds if args.budget_seconds is not None else defaults["budget_seconds"],
        max_call_seconds=args.max_call_seconds or defaults["max_call_seconds"],
        memory_cap_bytes=cap if device.type == "cpu" else None,
        min_seconds=args.min_seconds if args.min_seconds is not None else defaults["min_seconds"],
        seed=args.seed,
    )
    variants = [Variant.parse(name) for name in args.variants]
    plan = build_plan(args.full, device.type == "cuda", args.impl, variants)
    backends = [b for b in ("native", "reference") if b in args.impl]
    if args.full:
        training = [(b, v) for b in backends for v in variants if b == "native" or v == TRAINING_VARIANT]
    else:
        training = [(b, TRAINING_VARIANT if TRAINING_VARIANT in variants else variants[0]) for b in backends]
    training = [("ce", None)] + training

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tmp",
                                   f"{device.type}-{mode}")
    results = {
        "metadata": machine,
        "settings": {
            "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "device": device.type,
            "full": args.full,
            "impls": args.impl,
            "variants": args.variants,
            "budget_seconds": settings.budget_seconds,
            "max_call_seconds": settings.max_call_seconds,
            "memory_cap_bytes": settings.memory_cap_bytes,
            "min_seconds": settings.min_seconds,
            "min_repeats": settings.min_repeats,
            "seed": settings.seed,
            "clock": "CUDA events, one synchronisation per repeat" if device.type == "cuda" else "time.perf_counter",
            "memory_method": ("torch.cuda.max_memory_allocated above the memory allocated before the step"
                              if device.type == "cuda" else
                              "growth of the process's peak resident set (VmHWM) over one step"
                              if cpu_memory_supported() else "not available on this system"),
        },
        "records": [],
        "training_step": [],
    }

    def save(plots: bool):
        # After every case, so that a run cut short (a GPU loan's time limit) keeps what it measured.
        results["elapsed_seconds"] = time.perf_counter() - started
        results["load_average"] = {"start": load_at_start, "end": os.getloadavg()}  # others' work on the machine
        return report.write(out, results, plots=plots)

    # The plain loops' rates for the floors, at the start and again at the end (the machine's load
    # changes); the report uses the faster of the two, the stricter floor.
    rates_at_start = floor.measure_rates(device)
    results["rates"] = {"start": rates_at_start and rates_at_start.as_dict()}
    runner = Runner(settings)
    total = len(plan) + 1
    progress = tqdm(total=total, unit="case", dynamic_ncols=True) if tqdm else _PrintedProgress(total)

    def training_step():
        progress.set_postfix_str("training step", refresh=False)
        results["training_step"] = runner.run_training_steps(training)
        save(plots=False)
        progress.update()

    for group in plan:
        if group.section > 1 and not results["training_step"]:  # the training step right after the configs
            training_step()
        progress.set_postfix_str(f"{group.shape.describe()} {group.variant.name}", refresh=False)
        results["records"] += runner.run_group(group)
        save(plots=False)
        progress.update()
    if not results["training_step"]:
        training_step()
    progress.close()
    rates_at_end = floor.measure_rates(device)
    results["rates"]["end"] = rates_at_end and rates_at_end.as_dict()
    paths = save(plots=True)
    print("\n" + report.headline_table(results))
    print(report.training_table(results))
    print(report.floor_summary(results))
    print(report.noise_summary(results))
    print(f"{results['elapsed_seconds']:.0f} s; wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
