#!/usr/bin/env bash
# The GPU check, in one call of at most 570 s on a machine with an NVIDIA GPU (docs/kernels.md,
# "The GPU check"):
#
#   OUT=/tmp/gpu-check bash tools/gpu_check.sh
#
# Steps, in order, each under `timeout -k 2 LIMIT` (the limits and kill delays add up to 570 s;
# the cold build's critical path is cuda/mining.cu, about two minutes on one core):
# build in place; the kernels load and run (the check stops at once if either fails); the CUDA
# tests (tests/test_cuda.py on the GPU; CI runs their emulated-device half); compute-sanitizer memcheck and initcheck (with
# PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every buffer is its own allocation), then racecheck, on
# tools/sanitizer_case.py; the headline timings (tools/cuda_quick_timing.py: eager and CUDA-graph
# replay against a null step, CelebA-like config and B=4096); the fixed cost per step
# (tools/host_overhead.py); the mining regimes (tools/cuda_mining_bench.py); the compile check.
# After every step a row goes to $OUT/summary.txt and $OUT/results.tar.gz is rewritten (all
# logs, timings JSON and markdown), so a run cut off by its limit still returns what it finished.
#
# Wheels in the git-ignored .whl/ beside the checkout (hypothesis for the tests, and
# pytorch-metric-learning for the benchmarks) are installed into a private target first: the
# GPU machine has no network.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# An extension must share torch's C++ runtime: a compiler that links libstdc++ statically (as
# the H200 image's default /opt/gcc does) makes every formatted error message crash. The
# system g++ links it dynamically.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")

SITE=$(mktemp -d)/site
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl > "$LOGS/wheels.txt" 2>&1
fi
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}

row() {  # row NAME STATUS SECONDS TEXT: one line of the summary, and the archive rewritten
  printf '%-10s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/summary.txt"
  tar -czf "$OUT/results.tar.gz" -C "$OUT" summary.txt logs
}

status=0
step() {  # step NAME LIMIT COMMAND...: run it with a time limit, log it, write its row
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout -k 2 "$limit" "$@" > "$LOGS/$name.txt" 2>&1
  rc=$?
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="timeout"; elif [ "$rc" -ne 0 ]; then verdict="rc=$rc"; fi
  [ "$rc" -ne 0 ] && status=1
  row "$name" "$verdict" "$((SECONDS - start))/$limit" "$(grep -v '^\s*$' "$LOGS/$name.txt" | tail -n 1 | cut -c1-140)"
  return "$rc"
}

stop() {  # a failed build or kernels that do not load end the check
  row "stop" "-" "0" "$1: the remaining steps need the kernels (see logs/)"
  exit 1
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$CUDA_HOME/bin/nvcc" --version | tail -n 1
  "$SANITIZER" --version | head -n 1; } > "$LOGS/machine.txt" 2>&1
row "machine" "-" "0" "$(head -n 2 "$LOGS/machine.txt" | paste -sd ' ' | cut -c1-140)"

LOAD_CHECK='
import glob, subprocess
import torch, crl_ops
from crl_ops import _native
library = glob.glob("crl_ops/_C*.so")[0]
if "libstdc++" not in subprocess.run(["ldd", library], capture_output=True, text=True).stdout:
    raise SystemExit(f"{library} links libstdc++ statically")
for device in ("cpu", "cuda"):
    _native.require(torch.device(device))
g = torch.Generator().manual_seed(0)
features = torch.randn(64, 3, 8, generator=g).cuda().requires_grad_()
logits = torch.randn(64, 3, generator=g).cuda()
labels = (torch.rand(64, 3, generator=g) < 0.3).long().cuda()
loss = crl_ops.CRL()(features, logits, labels)
loss.backward()
torch.cuda.synchronize()
print(f"the kernels load and run on {torch.cuda.get_device_name()}: loss {loss.item():.6f}")
'

step build 175 python3 setup.py -q build_ext --inplace || stop "the build failed"
step load 18 python3 -c "$LOAD_CHECK" || stop "the kernels do not load"
step tests 110 python3 -m pytest -v -p no:cacheprovider --durations=10 tests/test_cuda.py -k "not compile and not emulated"
step memcheck 50 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
  python3 tools/sanitizer_case.py
step initcheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool initcheck --error-exitcode 1 \
  python3 tools/sanitizer_case.py
step racecheck 30 "$SANITIZER" --tool racecheck --error-exitcode 1 python3 tools/sanitizer_case.py --quick
step timing 38 python3 tools/cuda_quick_timing.py --out "$LOGS/timing"
step host 21 python3 tools/host_overhead.py --device cuda --out "$LOGS/host_overhead"
# Slot of the mining regime benchmark (the mining helper's tools/cuda_mining_bench.py).
if [ -f tools/cuda_mining_bench.py ]; then
  step mining 20 python3 tools/cuda_mining_bench.py --device cuda --out "$LOGS/mining" --budget-seconds 12
else
  row "mining" "absent" "0" "tools/cuda_mining_bench.py is not in this checkout"
fi
step compile 48 bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k compile &&
  python3 examples/ddp/gpu_compile_amp_check.py --backends native"
exit $status
