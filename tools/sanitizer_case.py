"""A CUDA workload that runs every kernel of crl_ops, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tools/sanitizer_case.py            # also --tool initcheck
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitizer_case.py --quick
    python tools/sanitizer_case.py --device cpu   # the same calls on the CPU kernels (a dry run)

The full set covers B > 1024, K from 17 to 64 (the mining's register lists) and above 64 (its
general path), bfloat16, float16, float32 and float64 features, binary, [B, A, C] and padded
list logits, both reductions, histograms staged in shared memory and not, the atomic and the
deterministic backward, and validate=False with non-finite values (the flag reductions). With
PYTORCH_NO_CUDA_MEMORY_CACHING=1 every allocation is its own, so memcheck sees each buffer's
bounds and initcheck every read of an entry no kernel wrote. --quick (for racecheck, which is
slow) keeps one small case per kernel path. One line per case; exit status 0 when all ran.
"""
import argparse
import math
import time

import torch

import crl_ops

MODES = ("class", "instance")
FORMS = ("relative", "absolute", "distribution")

# (name, batch, num_classes, dim, logits format, dtype, k, bins, reduction)
FULL = [
    ("b1100-bfloat16-k20", 1100, (2, 5), 8, "list", torch.bfloat16, 20, 100, "pooled"),
    ("b300-float32-k64-binary", 300, (2, 2, 2, 2), 9, "binary", torch.float32, 64, 7, "attribute"),
    ("b200-float64-k100-bins600", 200, (3, 3), 6, "tensor3d", torch.float64, 100, 600, "pooled"),
    ("b150-float16-k5", 150, (4, 2), 33, "list", torch.float16, 5, 100, "attribute"),
]
QUICK = [
    ("b200-bfloat16-k20", 200, (2, 4), 12, "list", torch.bfloat16, 20, 100, "pooled"),
    ("b100-float32-k80-bins600", 100, (3,), 5, "tensor3d", torch.float32, 80, 600, "attribute"),
]


def batch(seed, size, num_classes, dim, logit_format, dtype, device):
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.multinomial(torch.softmax(2.0 * torch.randn(c, generator=g), 0), size,
                                            replacement=True, generator=g) for c in num_classes], 1)
    labels[torch.rand(size, len(num_classes), generator=g) < 0.1] = -1
    features = torch.randn(size, len(num_classes), dim, generator=g)
    if logit_format == "binary":
        logits = torch.randn(size, len(num_classes), generator=g)
    elif logit_format == "tensor3d":
        logits = torch.randn(size, len(num_classes), num_classes[0], generator=g)
    else:
        logits = [torch.randn(size, c, generator=g).to(device) for c in num_classes]
    if not isinstance(logits, list):
        logits = logits.to(device)
    return features.to(device, dtype).requires_grad_(), logits, labels.to(device)


def run_case(case, device):
    name, size, num_classes, dim, logit_format, dtype, k, bins, reduction = case
    features, logits, labels = batch(len(name), size, num_classes, dim, logit_format, dtype, device)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        for mode in MODES:
            for form in FORMS:
                crl = crl_ops.CRL(mode, form, k=k, bins=bins, reduction=reduction, backend="native")
                loss = crl(features, logits, labels)
                (grad,) = torch.autograd.grad(loss, features)
                if not (torch.isfinite(loss) and torch.isfinite(grad).all()):
                    raise RuntimeError(f"{name} {mode}/{form}: non-finite loss or gradient")
    torch.use_deterministic_algorithms(False)


def run_unchecked(device):
    """validate=False with a NaN feature, an overflowing batch and an out-of-range label: the
    reductions of the finite and overflow flags, no assertion, NaN results."""
    features, logits, labels = batch(7, 64, (2, 3), 8, "list", torch.float32, device)
    labels[5, 0] = 9
    poisoned = features.detach().clone()
    poisoned[3, 1, 2] = math.nan
    for values in (poisoned, features.detach() * 1e20):
        values.requires_grad_()
        for form in FORMS:
            loss = crl_ops.CRL("instance", form, validate=False, backend="native")(values, logits, labels)
            (grad,) = torch.autograd.grad(loss, values)
            if not (torch.isnan(loss) and torch.isnan(grad).all()):
                raise RuntimeError(f"validate=False {form}: expected a NaN loss and NaN gradients")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small set, for racecheck")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    crl_ops._native.require(torch.device(args.device))
    for case in QUICK if args.quick else FULL:
        start = time.perf_counter()
        run_case(case, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"{case[0]}: ok ({time.perf_counter() - start:.1f} s)", flush=True)
    run_unchecked(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print("validate=False: ok", flush=True)
    print("sanitizer case: all ran", flush=True)


if __name__ == "__main__":
    main()
