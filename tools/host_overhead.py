"""The fixed cost of one CRL forward + backward against a null autograd step, on a tiny batch.

    python tools/host_overhead.py [--device cpu|cuda] [--distributed] [--out DIR]   # DIR/results.{json,md}

On a tiny batch (B=8, A=2 binary attributes, D=4) the kernels' own work is negligible, so the time
per step is what every step pays before any arithmetic: Python, the dispatcher, autograd,
allocations and launches. At the paper's batch sizes on a GPU that is most of the step. The
baseline is the null step `torch.autograd.grad(x.square().sum(), x)` on a tensor of the
features' size, timed in the same run, interleaved with the CRL steps (so load on the machine
affects both alike); the target of issue #11 is a default `CRL()` step at most 2x the null step.
With --distributed, `distributed=True` cases too: the same batch on a process group of one rank
(gloo on the CPU, NCCL on CUDA) with batch_sizes="equal", the fixed cost of a rank's step,
collectives included.

Clock: wall time per step over runs of N steps (on CUDA synchronised once per run, so it is the
host's issue time unless the GPU is slower); median and spread of the runs. The counts of
dispatched compute ops (views excluded) and CUDA kernels come from one profiled step.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import crl_ops

BATCH, ATTRIBUTES, DIM = 8, 2, 4
VIEWS = {"aten.detach.default", "aten.view.default", "aten.expand.default", "aten.alias.default",
         "aten._unsafe_view.default", "aten.t.default", "aten.select.int", "aten.slice.Tensor",
         "aten.unsqueeze.default"}


def inputs(device):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, ATTRIBUTES, DIM, generator=g).to(device).requires_grad_()
    logits = torch.randn(BATCH, ATTRIBUTES, generator=g).to(device)  # the binary [B, A] format
    labels = (torch.rand(BATCH, ATTRIBUTES, generator=g) < 0.3).long().to(device)
    return features, logits, labels


def run_time(step, device, steps):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def op_and_kernel_counts(step, device):
    with _Ops() as ops:
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return [n for n in ops.names if n not in VIEWS], kernels


def one_rank_group(device, store):
    """A process group of one rank for the distributed=True cases; False where it cannot start."""
    try:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                                world_size=1)
        return True
    except (RuntimeError, ValueError) as error:
        print(f"no one-rank process group ({error}): the distributed=True cases are left out")
        return False


def measure(device, steps=500, runs=9, distributed=False):
    features, logits, labels = inputs(device)
    null_x = torch.randn(BATCH, ATTRIBUTES, DIM, device=device, requires_grad=True)
    seed = torch.ones((), device=device)

    def null_step():
        torch.autograd.grad(null_x.square().sum(), null_x, grad_outputs=seed)

    cases = [("null step", None, None, null_step)]
    for mode in crl_ops.MODES:
        for form in crl_ops.FORMS:
            for backend in ("native", "reference"):
                crl = crl_ops.CRL(mode, form, backend=backend)

                def step(crl=crl):
                    torch.autograd.grad(crl(features, logits, labels), features, grad_outputs=seed)

                cases.append((f"{mode}-{form}", backend, crl, step))
    if distributed:
        for mode in crl_ops.MODES:
            crl = crl_ops.CRL(mode, "relative", backend="native", distributed=True, batch_sizes="equal")

            def step(crl=crl):
                torch.autograd.grad(crl(features, logits, labels), features, grad_outputs=seed)

            cases.append((f"{mode}-relative, distributed=True", "native", crl, step))
    for _, _, _, step in cases:
        for _ in range(50):
            step()
    times = {name_backend: [] for name_backend in ((c[0], c[1]) for c in cases)}
    for _ in range(runs):  # interleaved: a load that comes and goes hits every case alike
        for name, backend, _, step in cases:
            times[(name, backend)].append(run_time(step, device, steps))
    null = statistics.median(times[("null step", None)])
    rows = []
    for name, backend, _, step in cases:
        samples = times[(name, backend)]
        median = statistics.median(samples)
        ops, kernels = op_and_kernel_counts(step, device)
        rows.append(dict(case=name, backend=backend, us_per_step=round(median, 1),
                         spread=round(max(samples) - min(samples), 1), vs_null=round(median / null, 2),
                         compute_ops=len(ops), ops=ops, kernels=kernels))
    return rows


def write(out_dir, device, rows):
    """results.json and results.md (one table) under out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    distributed_flag = " --distributed" if any("distributed" in r["case"] for r in rows) else ""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    header = {"device": device, "device_name": name, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
              "shape": {"B": BATCH, "A": ATTRIBUTES, "D": DIM}, "cpu_count": os.cpu_count()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    lines = [
        f"# Fixed cost per CRL step: {device} ({name}), {header['date']}",
        "",
        f"`python tools/host_overhead.py --device {device}{distributed_flag}`; torch {torch.__version__}, "
        f"{header['threads']} thread(s). One forward + backward (`torch.autograd.grad`) of the default "
        f"`CRL(mode, form)` on B={BATCH}, A={ATTRIBUTES} binary attributes, D={DIM}, against the null step "
        "`torch.autograd.grad(x.square().sum(), x)`, interleaved in one run: microseconds per step (median of "
        "9 runs of 500 steps, and their spread), the ratio to the null step, compute ops dispatched (views "
        "excluded), CUDA kernels launched." + (" The distributed=True rows: the same step on a process group of "
                                               "one rank, collectives included." if distributed_flag else ""),
        "",
        "| case | backend | µs/step | spread | vs null step | compute ops | kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['backend'] or ''} | {r['us_per_step']} | {r['spread']} | {r['vs_null']}x | "
              f"{r['compute_ops']} | {r['kernels']} |" for r in rows]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--distributed", action="store_true", help="also distributed=True on a one-rank group")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        distributed = args.distributed and one_rank_group(args.device, os.path.join(tmp, "store"))
        rows = measure(args.device, distributed=distributed)
        if distributed:
            dist.destroy_process_group()
    print(f"{args.device}, torch {torch.__version__}; B={BATCH} A={ATTRIBUTES} D={DIM}; microseconds per step")
    print(f"{'case':36}{'backend':11}{'us/step':>9}{'spread':>8}{'vs null':>9}{'ops':>5}{'kernels':>9}")
    for r in rows:
        print(f"{r['case']:36}{r['backend'] or '':11}{r['us_per_step']:9.1f}{r['spread']:8.1f}{r['vs_null']:8.2f}x"
              f"{r['compute_ops']:5}{r['kernels']:9}")
    if args.out:
        write(args.out, args.device, rows)


if __name__ == "__main__":
    main()
