"""The fixed cost of one CRL forward+backward: Python, dispatcher, allocations and launches.

    python tools/host_overhead.py [--device cpu|cuda] [--out DIR]   # DIR/results.json, DIR/results.md

On a tiny batch (B=8, A=2, D=4) the kernels' own work is negligible, so the time per step is
what every step pays before any arithmetic: at the paper's batch sizes on a GPU, that is most
of the step. Wall clock per step (on CUDA synchronised once per run of N steps, so it is the
host's issue time unless the GPU is slower), median and spread of 7 runs. The op count (ops
called from Python or the autograd engine; those an op calls inside count with it) and the
CUDA kernel count come from one profiled step.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import crl_ops

BATCH, ATTRIBUTES, DIM = 8, 2, 4


def inputs(device):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, ATTRIBUTES, DIM, generator=g).to(device).requires_grad_()
    logits = torch.randn(BATCH, ATTRIBUTES, 2, generator=g).to(device)
    labels = (torch.rand(BATCH, ATTRIBUTES, generator=g) < 0.3).long().to(device)
    return features, logits, labels


def microseconds_per_step(step, device, steps=500, runs=7):
    for _ in range(50):
        step()
    times = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(times), max(times) - min(times)


def _is_op(event) -> bool:
    return event.name.startswith(("aten::", "crl_ops::"))


def launches(step, device):
    """(ops dispatched from Python or the autograd engine, not from inside another op; CUDA
    kernels and memsets) in one step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.events()
    ops = 0
    for event in events:
        parent = event.cpu_parent
        while parent is not None and not _is_op(parent):
            parent = parent.cpu_parent
        ops += _is_op(event) and parent is None
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return ops, kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    features, logits, labels = inputs(args.device)
    rows = []
    print(f"{args.device}, torch {torch.__version__}; B={BATCH} A={ATTRIBUTES} D={DIM}; microseconds per step")
    print(f"{'variant':24}{'backend':11}{'us/step':>9}{'spread':>8}{'ops':>6}{'kernels':>9}")
    for mode in ("class", "instance"):
        for form in ("relative", "absolute", "distribution"):
            for backend in ("native", "reference"):
                crl = crl_ops.CRL(mode=mode, form=form, backend=backend, validate=False)

                def step():
                    crl(features, logits, labels).backward()

                median, spread = microseconds_per_step(step, args.device)
                ops, kernels = launches(step, args.device)
                rows.append(dict(mode=mode, form=form, backend=backend, us_per_step=round(median, 1),
                                 spread=round(spread, 1), ops=ops, kernels=kernels))
                print(f"{mode + '/' + form:24}{backend:11}{median:9.1f}{spread:8.1f}{ops:6}{kernels:9}", flush=True)
    if args.out:
        write(args.out, args.device, rows)


def write(out_dir, device, rows):
    """results.json and results.md (one table) under out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    header = {"device": device, "device_name": name, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
              "shape": {"B": BATCH, "A": ATTRIBUTES, "D": DIM}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    lines = [
        f"# Fixed cost per CRL step: {device} ({name}), {header['date']}",
        "",
        f"`python tools/host_overhead.py --device {device}`; torch {torch.__version__}, {header['threads']} "
        f"thread(s). One forward + backward of `CRL(validate=False)` on B={BATCH}, A={ATTRIBUTES}, D={DIM}: "
        "microseconds per step (median of 7 runs of 500 steps, and their spread), ops dispatched from Python "
        "or autograd, CUDA kernels launched.",
        "",
        "| variant | backend | µs/step | spread | ops | kernels |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['mode']}-{r['form']} | {r['backend']} | {r['us_per_step']} | {r['spread']} | {r['ops']} | "
              f"{r['kernels']} |" for r in rows]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
