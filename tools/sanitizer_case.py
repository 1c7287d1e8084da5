"""A small CUDA workload touching every kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python tools/sanitizer_case.py [--quick]

--quick: float32 only (racecheck is slow).
"""
import sys

import torch

import crl_ops


def main():
    g = torch.Generator().manual_seed(0)
    batch = 70
    labels = torch.stack([torch.multinomial(torch.tensor(p), batch, replacement=True, generator=g)
                          for p in ([0.8, 0.2], [0.5, 0.3, 0.1, 0.1], [0.6, 0.3, 0.1])], 1)
    labels[torch.rand(batch, 3, generator=g) < 0.1] = -1
    dtypes = (torch.float32,) if "--quick" in sys.argv else (torch.float32, torch.float16, torch.float64)
    for dtype in dtypes:
        features = torch.randn(batch, 3, 37, generator=g).to("cuda", dtype).requires_grad_()
        logits = [torch.randn(batch, c, generator=g).cuda() for c in (2, 4, 3)]
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            for k in (3, 40):  # register lists and the general path
                for mode in ("class", "instance"):
                    for form in ("relative", "absolute", "distribution"):
                        crl = crl_ops.CRL(mode=mode, form=form, k=k, backend="native")
                        crl(features, logits, labels.cuda()).backward()
    torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()
    print("sanitizer case: ok")


if __name__ == "__main__":
    main()
