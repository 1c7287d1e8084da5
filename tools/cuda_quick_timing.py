"""Headline timings of one CRL forward + backward: native kernels, the reference and a null step.

    python tools/cuda_quick_timing.py [--out DIR] [--device cuda|cpu]   # DIR/timing.json, DIR/timing.md

Configs: the paper's CelebA step (B=128, A=40 binary attributes, D=64, K=5) and B=4096. Clocks:
"eager" is a plain Python loop (what a training script sees, host dispatch included); "graph"
replays the same step captured in a CUDA graph (the GPU's own time, as under
torch.compile(mode="reduce-overhead")). The null step `torch.autograd.grad(x.square().sum(), x)`
on a tensor of the features' size is the baseline of what any step costs on this host. CUDA
events around N steps after a warm-up, median and spread of 5 runs (wall clock on the CPU).

Rows are written as they are measured (the JSON rewritten, the markdown appended), and the end
checks the targets of issue #11 at the CelebA config, instance mode, relative form:
graph replay <= 30 us; eager <= 2x the null step; native >= 10x faster than the reference.
--device cpu is a dry run of the same steps at the CelebA config (eager only, fewer runs).
"""
import argparse
import json
import os
import statistics
import time

import torch

import crl_ops

CONFIGS = {"celeba": (128, 40, 64), "b4096": (4096, 40, 64)}
HEADLINE = ("celeba", "instance", "relative")
VARIANTS = [HEADLINE[1:]] + [(mode, form) for mode in ("class", "instance")
                             for form in ("relative", "absolute", "distribution") if (mode, form) != HEADLINE[1:]]
GRAPH_TARGET_US, EAGER_TARGET_RATIO, SPEEDUP_TARGET = 30.0, 2.0, 10.0


def inputs(batch, attributes, dim, device):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, attributes, dim, generator=g)
    logits = torch.randn(batch, attributes, generator=g)
    minority = torch.linspace(0.02, 0.45, attributes)  # imbalance from 1:49 to about 1:1
    labels = (torch.rand(batch, attributes, generator=g) < minority).long()
    return features.to(device).requires_grad_(), logits.to(device), labels.to(device)


class Clock:
    def __init__(self, device, runs, warmup):
        self.device, self.runs, self.warmup = device, runs, warmup

    def per_step(self, run, steps):
        """(median, spread) microseconds per call of run() over `runs` runs of `steps` calls."""
        times = []
        for _ in range(self.runs):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1000 / steps)
            else:
                start = time.perf_counter()
                for _ in range(steps):
                    run()
                times.append((time.perf_counter() - start) * 1e6 / steps)
        return statistics.median(times), max(times) - min(times)

    def eager(self, step, steps):
        for _ in range(self.warmup):
            step()
        return self.per_step(step, steps)

    def graph(self, step, steps):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        return self.per_step(captured.replay, steps)


class Report:
    """Rows in DIR/timing.json (rewritten after each row) and DIR/timing.md (appended)."""

    def __init__(self, out, device):
        self.rows = []
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.header = {"device": self.device_name, "torch": torch.__version__, "crl_ops": crl_ops.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.json_path = self.md_path = None
        if out:
            os.makedirs(out, exist_ok=True)
            self.json_path, self.md_path = os.path.join(out, "timing.json"), os.path.join(out, "timing.md")
            with open(self.md_path, "w") as f:
                f.write(f"{self.device_name}, torch {torch.__version__}: microseconds per forward + backward\n\n"
                        "| config | variant | backend | clock | us/step | spread |\n|---|---|---|---|---:|---:|\n")
        print(f"{self.device_name}, torch {torch.__version__}; microseconds per forward + backward", flush=True)

    def add(self, config, variant, backend, clock, median, spread):
        row = dict(config=config, variant=variant, backend=backend, clock=clock, us_per_step=round(median, 1),
                   spread=round(spread, 1))
        self.rows.append(row)
        print(f"{config:8}{variant:24}{backend:11}{clock:8}{median:12.1f}{spread:11.1f}", flush=True)
        if self.md_path:
            with open(self.md_path, "a") as f:
                f.write(f"| {config} | {variant} | {backend} | {clock} | {median:.1f} | {spread:.1f} |\n")
            self.write_json()

    def find(self, config, variant, backend, clock):
        for row in self.rows:
            if (row["config"], row["variant"], row["backend"], row["clock"]) == (config, variant, backend, clock):
                return row["us_per_step"]
        return None

    def write_json(self, targets=None):
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({**self.header, "rows": self.rows, "targets": targets or []}, f, indent=1)

    def targets(self):
        """The targets of the headline config, as (name, value, limit, ok) rows."""
        config, mode, form = HEADLINE
        variant = f"{mode}/{form}"
        graph = self.find(config, variant, "native", "graph")
        eager = self.find(config, variant, "native", "eager")
        null = self.find(config, "null step", "torch", "eager")
        reference = self.find(config, variant, "reference", "eager")
        checks = []
        if graph is not None:
            checks.append(("graph replay, us", graph, GRAPH_TARGET_US, graph <= GRAPH_TARGET_US))
        if eager is not None and null:
            ratio = eager / null
            checks.append(("eager / null step", round(ratio, 2), EAGER_TARGET_RATIO, ratio <= EAGER_TARGET_RATIO))
        if eager and reference is not None:
            speedup = reference / eager
            checks.append(("reference / native (eager)", round(speedup, 1), SPEEDUP_TARGET, speedup >= SPEEDUP_TARGET))
        lines = [f"| {name} | {value} | {'<=' if name != 'reference / native (eager)' else '>='} {limit} | "
                 f"{'PASS' if ok else 'FAIL'} |" for name, value, limit, ok in checks]
        print("\n".join(lines), flush=True)
        if self.md_path:
            with open(self.md_path, "a") as f:
                f.write(f"\nTargets at {config}, {variant}:\n\n| target | measured | limit | |\n|---|---:|---:|---|\n")
                f.write("\n".join(lines) + "\n")
        self.write_json([dict(target=n, measured=v, limit=l, ok=ok) for n, v, l, ok in checks])
        # One closing line (the GPU check's summary shows the last line of each step).
        print("targets: " + "; ".join(f"{n} {v} {'PASS' if ok else 'FAIL'}" for n, v, _, ok in checks), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for timing.json and timing.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="steps per run of the native and null steps (cuda 200, cpu 3)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    steps_native = args.steps or (200 if cuda else 3)
    clock = Clock(args.device, runs=5 if cuda else 2, warmup=10 if cuda else 1)
    report = Report(args.out, args.device)
    clocks = [("eager", clock.eager)] + ([("graph", clock.graph)] if cuda else [])
    for config, shape in CONFIGS.items() if cuda else [("celeba", CONFIGS["celeba"])]:
        features, logits, labels = inputs(*shape, args.device)
        small = shape[0] <= 1024
        x = torch.randn_like(features).requires_grad_()
        for name, measure in clocks:
            report.add(config, "null step", "torch", name,
                       *measure(lambda: torch.autograd.grad(x.square().sum(), x), steps_native))
        # The reference last (a step that cannot be captured must not disturb the others), once
        # per config: it is slow at B=4096.
        cases = [(mode, form, "native", name, measure) for mode, form in VARIANTS for name, measure in clocks]
        cases += [(*HEADLINE[1:], "reference", name, measure) for name, measure in clocks if small or name == "eager"]
        for mode, form, backend, name, measure in cases:
            crl = crl_ops.CRL(mode, form, backend=backend)

            def step():
                torch.autograd.grad(crl(features, logits, labels), features)

            steps = steps_native if backend == "native" else (20 if small and cuda else 2)
            try:
                median, spread = measure(step, steps)
            except RuntimeError as error:  # e.g. a capture that fails: report it, go on
                print(f"{config:8}{mode + '/' + form:24}{backend:11}{name:8} failed: {error}", flush=True)
                continue
            report.add(config, f"{mode}/{form}", backend, name, median, spread)
    report.targets()


if __name__ == "__main__":
    main()
