#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU: build the extension in place
# (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise), run the CUDA tests (native CUDA against
# the reference on the same GPU, against the float64 oracle, and against the CPU kernels),
# compute-sanitizer memcheck, racecheck and initcheck on a small workload, the headline
# timings, the fixed cost per step (ops, kernels and host time on a tiny batch), the benchmark
# sweep, and the compile + autocast check. Writes $OUT/summary.txt and $OUT/results.tar.gz
# (every log, timings JSON, benchmark results).
#
#   OUT=/tmp/gpu-check bash tools/gpu_check.sh [benchmark seconds, default 120]
#
# The benchmark's pytorch-metric-learning column needs that package importable (PYTHONPATH).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
LOGS=$(mktemp -d)/logs
mkdir -p "$OUT" "$LOGS"
BENCH_SECONDS=${1:-120}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# An extension must share torch's C++ runtime: a compiler that links libstdc++ statically (as
# the H200 image's default /opt/gcc does) makes every formatted error message crash. The
# system g++ links it dynamically.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, one summary line
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  printf '%-12s rc=%-4s%5ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$LOGS/$name.txt" | cut -c1-110)" |
    tee -a "$OUT/summary.txt"
  tar -czf "$OUT/results.tar.gz" -C "$(dirname "$LOGS")" logs  # after every step: a cut-off run keeps the rest
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"; } |
  tee "$LOGS/gpu.txt" "$OUT/summary.txt"
step build 300 python3 setup.py build_ext --inplace
ldd crl_ops/_C*.so | grep -q libstdc++ || echo "WARNING: the extension links libstdc++ statically" | tee -a "$OUT/summary.txt"
# Steps in order of what a cut-off run should still have delivered: correctness, the headline
# timings, the sanitizers, then the sweeps.
step tests 180 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_native.py -k cuda
step timing 150 python3 tools/cuda_quick_timing.py --out "$LOGS/timing.json"
step host 90 python3 tools/host_overhead.py --device cuda --out "$LOGS/host_overhead"
step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitizer_case.py
# The kernels write their outputs without a prior fill: initcheck finds any entry read unwritten.
step initcheck 120 compute-sanitizer --tool initcheck --error-exitcode 1 python3 tools/sanitizer_case.py --quick
step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/sanitizer_case.py --quick
step bench $((BENCH_SECONDS + 60)) python3 -m benchmarks --device cuda --budget-seconds "$BENCH_SECONDS" --out "$LOGS/bench"
step compile_amp 150 python3 examples/ddp/gpu_compile_amp_check.py
exit $status
