#!/usr/bin/env bash
# Proves that a plain `pip install <checkout>` (pip's default build isolation, no flags) gives
# working native kernels: a fresh virtual environment with torch, the install, then, from
# another directory so that the installed package is the one imported, the first native use
# compiles the kernels into an empty extension cache and the native loss equals the reference;
# a second process then loads them from the cache without compiling.
#
#   bash tools/check_install.sh [checkout, default: this one]
#
# TORCH_SPEC (default torch==2.13.0, the CPU wheel on the CI machine's disk) and PYTHON
# (default python3) choose the environment. Prints the install and first-use compile seconds.
set -euo pipefail
checkout=$(cd "${1:-$(dirname "$0")/..}" && pwd)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$TORCH_SPEC"
start=$SECONDS
"$work/venv/bin/pip" install -q "$checkout"
install_seconds=$((SECONDS - start))

mkdir "$work/run"
cd "$work/run"
export TORCH_EXTENSIONS_DIR="$work/torch_extensions"
"$work/venv/bin/python" - "$checkout" "$install_seconds" <<'PY'
import sys
import time

import torch

start = time.monotonic()
import crl_ops  # noqa: E402  (timed with the first use: either may compile)

checkout, install_seconds = sys.argv[1], sys.argv[2]
assert not crl_ops.__file__.startswith(checkout), f"imported the checkout ({crl_ops.__file__}), not the installed package"
import pathlib  # noqa: E402
emulation = pathlib.Path(crl_ops.__file__).parent / "csrc" / "emulation"
assert not emulation.exists(), f"the tests' emulated CUDA device is installed: {emulation}"
assert crl_ops.native_available("cpu"), f"no native CPU kernels: {crl_ops._build.ensure('cpu')}"
compile_seconds = time.monotonic() - start

torch.manual_seed(0)
batch, attributes, dim, classes = 96, 3, 16, 4
features = torch.randn(batch, attributes, dim, dtype=torch.float64)
logits = torch.randn(batch, attributes, classes, dtype=torch.float64)
labels = torch.multinomial(torch.tensor([0.7, 0.2, 0.07, 0.03]), batch * attributes, replacement=True).view(batch, attributes)
for mode in ("class", "instance"):
    for form in ("relative", "absolute", "distribution"):
        results = []
        for backend in ("native", "reference"):
            x = features.clone().requires_grad_()
            loss = crl_ops.CRL(mode=mode, form=form, backend=backend)(x, logits, labels)
            loss.backward()
            results.append((loss.detach(), x.grad))
        (native, native_grad), (reference, reference_grad) = results
        assert reference > 0, f"{mode}-{form}: nothing mined, the comparison would prove nothing"
        torch.testing.assert_close(native, reference)
        torch.testing.assert_close(native_grad, reference_grad)
print(f"check_install: isolated pip install {install_seconds} s, import and first native use (the compile) {compile_seconds:.0f} s, "
      f"native == reference for 6 losses (torch {torch.__version__}, {crl_ops.__file__})")
PY
"$work/venv/bin/python" - <<'PY'
import time

start = time.monotonic()
import crl_ops  # noqa: E402
from crl_ops import _build  # noqa: E402

assert crl_ops.native_available("cpu"), _build.ensure("cpu")
assert _build.ORIGINS["cpu"].endswith("(cached)"), f"compiled again: {_build.ORIGINS['cpu']}"
print(f"check_install: a second process imported crl_ops and loaded the kernels from the cache in {time.monotonic() - start:.1f} s")
PY
