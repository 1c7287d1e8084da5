"""Headline CUDA timings of one CRL forward+backward, native kernels vs the reference.

    python tools/cuda_quick_timing.py [--out FILE.json]

Two clocks: "eager" is a plain Python loop (what a training script sees: CPU dispatch
included); "graph" replays the same step captured in a CUDA graph (the GPU time, as with
torch.compile(mode="reduce-overhead")). CUDA events around N steps after warm-up; median of
3 runs. The full sweep is `python -m benchmarks --device cuda`.
"""
import argparse
import json
import statistics

import torch

import crl_ops

CONFIGS = {
    "celeba-like B=128 A=40 C=2 D=64": (128, 40, 64),
    "large B=4096 A=40 C=2 D=64": (4096, 40, 64),
}


def inputs(batch, attributes, dim):
    g = torch.Generator(device="cuda").manual_seed(0)
    features = torch.randn(batch, attributes, dim, device="cuda", generator=g, requires_grad=True)
    logits = torch.randn(batch, attributes, device="cuda", generator=g)
    minority = torch.linspace(0.02, 0.45, attributes, device="cuda")
    labels = (torch.rand(batch, attributes, device="cuda", generator=g) < minority).long()
    return features, logits, labels


def events_per_step(run, steps):
    runs = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) * 1000 / steps)
    return statistics.median(runs), max(runs) - min(runs)


def eager(step, steps):
    for _ in range(10):
        step()
    return events_per_step(step, steps)


def graph(step, steps):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        step()
    return events_per_step(captured.replay, steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds per forward+backward")
    print(f"{'config':34}{'variant':24}{'backend':11}{'clock':16}{'us/step':>10}{'spread':>9}")
    for name, shape in CONFIGS.items():
        features, logits, labels = inputs(*shape)
        small = shape[0] < 1000
        for mode in ("class", "instance"):
            for form in ("relative", "absolute", "distribution"):
                cases = [("native", True, eager), ("native", False, eager), ("native", False, graph),
                         ("reference", False, eager)]
                if small:
                    cases.append(("reference", False, graph))
                for backend, validate, clock in cases:
                    crl = crl_ops.CRL(mode=mode, form=form, backend=backend, validate=validate)

                    def step():
                        torch.autograd.grad(crl(features, logits, labels), features)

                    steps = 100 if backend == "native" or small else 5
                    label = clock.__name__ + (" validate" if validate else "")
                    try:
                        median, spread = clock(step, steps)
                    except RuntimeError as error:  # e.g. a capture that fails: report it, go on
                        print(f"{name:34}{mode + '/' + form:24}{backend:11}{label:16} failed: {error}", flush=True)
                        continue
                    rows.append(dict(config=name, mode=mode, form=form, backend=backend, clock=label,
                                     us_per_step=round(median, 1), spread=round(spread, 1)))
                    print(f"{name:34}{mode + '/' + form:24}{backend:11}{label:16}{median:10.1f}{spread:9.1f}",
                          flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
