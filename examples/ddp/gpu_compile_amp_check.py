"""One-GPU check of torch.compile + autocast: a model and BalancedLoss trained as one compiled graph.

    python examples/ddp/gpu_compile_amp_check.py                      # cuda, inductor, both backends
    python examples/ddp/gpu_compile_amp_check.py --device cpu --compiler aot_eager   # dry run

For each backend (native kernels, reference) and half-precision dtype (float16, bfloat16) it
compiles one training step (model forward under autocast, loss, with fullgraph=True) and runs it
on batches of one shape with different label mixes. It checks that
- one graph serves every batch (no graph break, no recompilation),
- the loss is float32 and finite, minority anchors are mined, and the gradients are finite,
- the loss equals the float32 model's loss on the same mined pairs to within the rounding of the
  half-precision model outputs (the tolerance of tests/test_amp.py).
Prints one PASS or FAIL line per check and exits with status 1 if any failed.
"""
import argparse
import math
import sys
import traceback

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import crl_ops
from crl_ops import reference

NUM_CLASSES = (2, 3, 5)
INPUT_SIZE = 12
BINS = 10
# bfloat16 / float16 round to 2^-9 / 2^-12 relative; a linear layer rounds input, weight and
# output (3 roundings), and the loss allows 4 times that.
END_TO_END_RTOL = {torch.bfloat16: 4 * 3 * 2**-9, torch.float16: 4 * 3 * 2**-12}
# One loss variant per dtype keeps it to four compilations (two backends x two dtypes).
CASES = ((torch.float16, "instance", "relative"), (torch.bfloat16, "class", "distribution"))


class AttributeNet(nn.Module):
    def __init__(self, width=64, feature_size=16):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(INPUT_SIZE, width), nn.ReLU())
        self.features = nn.Linear(width, len(NUM_CLASSES) * feature_size)
        self.classifiers = nn.ModuleList(nn.Linear(feature_size, c) for c in NUM_CLASSES)

    def forward(self, x):
        features = self.features(self.trunk(x)).view(x.shape[0], len(NUM_CLASSES), -1)
        return features, [head(features[:, j]) for j, head in enumerate(self.classifiers)]


def label_mixes(batch_size, device, count=3):
    g = torch.Generator().manual_seed(0)
    for skew in (3.0, 1.0, 2.0)[:count]:
        labels = torch.stack([
            torch.multinomial(torch.softmax(skew * torch.randn(c, generator=g), 0), batch_size, replacement=True,
                              generator=g)
            for c in NUM_CLASSES
        ], 1)
        yield torch.randn(batch_size, INPUT_SIZE, generator=g).to(device), labels.to(device)


def crl_on_pairs(features, partners, form):
    """The reference's l_crl of float32 features on given mined pairs (default margins)."""
    d, _ = reference.pair_distances(features, partners)
    margins = torch.tensor([2 * math.pi / c for c in NUM_CLASSES], device=features.device)
    return reference.reduce_sums(form, reference.form_sums(form, d, partners, margins, 1.0, BINS), "pooled")


def check(backend, dtype, mode, form, device, compiler):
    """Returns a list of (name, ok, detail)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AttributeNet().to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = crl_ops.BalancedLoss(mode=mode, form=form, k=3, bins=BINS, backend=backend)

    def step(x, labels):
        with torch.autocast(device.type, dtype):
            features, logits = model(x)
            return criterion(features, logits, labels)

    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    results, worst, anchors = [], 0.0, 0
    finite = True
    for x, labels in label_mixes(64, device):
        loss = compiled(x, labels)
        optimiser.zero_grad()
        loss.backward()
        finite &= loss.dtype == torch.float32 and bool(torch.isfinite(loss))
        finite &= all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        anchors += criterion.last_stats.summary()["anchors"]
        # The float32 model on the pairs mined under autocast (rounding may change the mining).
        with torch.no_grad(), torch.autocast(device.type, dtype):
            mined = crl_ops.mine(*model(x), labels, mode, k=3, backend=backend)
        partners = torch.cat([mined.positives, mined.negatives], -1)
        with torch.no_grad():
            features32, logits32 = model(x)
            want = (crl_on_pairs(features32, partners, form), crl_ops.cross_entropy(logits32, labels))
        for got, expected in zip((criterion.last_crl, criterion.last_ce), want):
            worst = max(worst, float((got - expected).abs() / expected.abs().clamp_min(1e-6)))
        optimiser.step()
    results.append(("one graph for all label mixes", counter.frame_count == 1, f"{counter.frame_count} graph(s)"))
    results.append(("float32 finite loss and finite gradients", finite, ""))
    results.append(("minority anchors mined", anchors > 0, f"{anchors} anchors"))
    rtol = END_TO_END_RTOL[dtype]
    results.append(("matches float32 on the same pairs", worst <= rtol, f"max rel err {worst:.2e} <= {rtol:.2e}"))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compiler", default="inductor", help="torch.compile backend")
    parser.add_argument("--backends", default="native,reference")
    args = parser.parse_args()
    device = torch.device(args.device)
    failures = 0
    for backend in args.backends.split(","):
        if backend == "native" and not crl_ops.native_available(device):
            print(f"FAIL native: no crl_ops kernels built for {device.type} (build with FORCE_CUDA=1)")
            failures += 1
            continue
        for dtype, mode, form in CASES:
            label = f"{backend} {str(dtype).removeprefix('torch.')} {mode}/{form} {args.compiler}"
            try:
                results = check(backend, dtype, mode, form, device, args.compiler)
            except Exception:  # report and carry on with the other combinations
                results = [("runs", False, traceback.format_exc())]
            for name, ok, detail in results:
                failures += not ok
                print(f"{'PASS' if ok else 'FAIL'} {label}: {name}{f' ({detail})' if detail else ''}")
    print(f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
