"""Timings of the profiling and mining ops against their floors, regime by regime (issue #15).

    python tools/cuda_mining_bench.py [--device cuda|cpu] [--out DIR] [--budget-seconds 80]

Times torch.ops.crl_ops.mine_instance, mine_class and profile (each op call as a user makes it:
its entry point's value check included) over K in {5, 16, 32, 64} (and one K beyond 64), C up to
10^5 and B from 128 to 16384, and writes DIR/results.json and DIR/results.md after every row, so
a run cut off by the budget or a time limit keeps what it measured. Rows past --budget-seconds
are skipped (and listed as skipped).

Each row states its floor and the fraction of it reached (floor / time):
- instance mining, arithmetic: anchors x B x D difference-square-add terms, 3 fp32 instructions
  each (subtract, multiply, add: the kernels build without FMA so that CUDA and CPU round
  alike). Assumed rate: SMs x fp32 lanes per SM (128 on sm_90) x the maximum SM clock / 3 terms
  per second (an H200: 132 x 128 x 1.98 GHz / 3 = 11.2 T terms/s). Practical rate: an
  elementwise kernel (torch.cuda.jiterator) running the same three-instruction chain, measured in
  this run. The memory floor (features read once, partner rows written once) is stated too; the
  floor is the larger of the two.
- class mining and profiling, memory: the bytes an ideal kernel moves (logits, labels, outputs)
  at the DRAM bandwidth of the device properties; practical: a copy measured in this run.

CUDA events around repeated calls after a warm-up; the median of 3 runs. With --device cpu the
native CPU kernels run on small problems with a wall clock: a smoke test of this script, no floors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

try:
    from tqdm import tqdm
except ImportError:  # the GPU image may lack it: plain printed rows then
    tqdm = None

import crl_ops
from crl_ops import _native

TERM_INSTRUCTIONS = 3  # subtract, multiply, add
FP32_LANES = {(8, 0): 64, (9, 0): 128}  # per SM; 128 for the other recent architectures
THRESHOLD = 0.5


@dataclass
class Case:
    op: str  # "instance", "class" or "profile"
    batch: int
    attributes: int
    classes: int  # 2: binary [B, A] logits
    dim: int = 64
    k: int = 5

    @property
    def name(self) -> str:
        text = f"{self.op} B={self.batch} A={self.attributes} C={self.classes}"
        if self.op == "instance":
            text += f" D={self.dim}"
        return text + (f" K={self.k}" if self.op != "profile" else "")


@dataclass
class Row:
    case: str
    op: str
    batch: int
    attributes: int
    classes: int
    dim: int
    k: int
    ms: float
    spread_ms: float
    anchors: int = 0
    active_lists: int = 0
    floor_kind: str = ""
    floor_ms: float | None = None  # at the assumed rate
    fraction: float | None = None  # floor_ms / ms
    practical_floor_ms: float | None = None  # at the rate measured in this run
    practical_fraction: float | None = None
    notes: list = field(default_factory=list)


# ---- the problems ------------------------------------------------------------------------------------------


def make_inputs(case: Case, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    b, a, c = case.batch, case.attributes, case.classes
    if c == 2:  # binary attributes with minority rates from 2% to 45%, as the paper's CelebA
        rates = torch.linspace(0.02, 0.45, a, device=device)
        labels = (torch.rand(b, a, device=device, generator=g) < rates).long()
        logits = torch.randn(b, a, device=device, generator=g)
    else:  # long-tailed classes (Zipf, exponent 1.1): many small classes with two or more samples
        weights = torch.arange(1, c + 1, device=device, dtype=torch.float64).pow(-1.1)
        labels = torch.multinomial(weights.expand(a, c), b, replacement=True, generator=g).T.contiguous()
        logits = torch.randn(b, a, c, device=device, generator=g)
    features = torch.randn(b, a, case.dim, device=device, generator=g) if case.op == "instance" else None
    num_classes = torch.full((a,), c, dtype=torch.long, device=device)
    return features, logits, labels, num_classes


def op_call(case: Case, features, logits, labels, num_classes):
    ops = torch.ops.crl_ops
    if case.op == "profile":
        return lambda: ops.profile(labels, num_classes, case.classes, THRESHOLD, False)
    _, _, active = ops.profile(labels, num_classes, case.classes, THRESHOLD, False)
    if case.op == "class":
        return lambda: ops.mine_class(logits, labels, num_classes, active, case.k, 0, case.batch, False)
    return lambda: ops.mine_instance(features, logits, labels, num_classes, active, case.k, 0, case.batch, False)


def cases_for(device: str) -> list[Case]:
    if device == "cpu":  # a smoke test on small problems
        return [Case("instance", 256, 4, 2, 32, 5), Case("instance", 256, 4, 2, 32, 64),
                Case("class", 512, 4, 2, k=5), Case("class", 512, 1, 1000, k=64),
                Case("profile", 4096, 4, 2), Case("profile", 4096, 1, 100_000)]
    # In order of what a run cut short should still have: the headline regime first.
    instance = [Case("instance", 4096, 40, 2, 64, k) for k in (5, 16, 32, 64)]
    instance += [Case("instance", 128, 40, 2, 64, 5), Case("instance", 128, 40, 2, 64, 64),
                 Case("instance", 1024, 40, 2, 64, 5), Case("instance", 1024, 40, 2, 64, 64),
                 Case("instance", 16384, 40, 2, 64, 5), Case("instance", 16384, 40, 2, 64, 64),
                 Case("instance", 4096, 40, 2, 16, 5), Case("instance", 4096, 4, 100, 64, 5),
                 Case("instance", 1024, 40, 2, 64, 256)]
    klass = [Case("class", b, 40, 2, k=k) for b in (128, 4096, 16384) for k in (5, 64)]
    klass += [Case("class", 4096, 1, c, k=k) for c in (100, 10_000, 100_000) for k in (5, 64)]
    profile = [Case("profile", b, 40, 2) for b in (128, 16384)]
    profile += [Case("profile", 16384, a, c) for a, c in ((1, 1000), (1, 100_000), (40, 100_000))]
    return instance + klass + profile


# ---- clocks and rates --------------------------------------------------------------------------------------


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def per_call_ms(call, device, target_s=0.1, max_calls=200):
    """Median over 3 runs of the time per call (CUDA events on CUDA), after a warm-up."""
    for _ in range(2):
        call()
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    calls = int(min(max_calls, max(3, target_s / max(time.perf_counter() - start, 1e-6))))
    runs = []
    for _ in range(3):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                call()
            end.record()
            end.synchronize()
            runs.append(begin.elapsed_time(end) / calls)
        else:
            start = time.perf_counter()
            for _ in range(calls):
                call()
            runs.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(runs), max(runs) - min(runs)


# The chain of a squared distance, eight independent ones per element, with round-to-nearest
# intrinsics so that NVRTC cannot contract them into FMAs.
PROBE_STEPS, PROBE_CHAINS = 128, 8
PROBE_CODE = """
template <typename T> T crl_terms_probe(T a, T b) {
  float x[8], s[8];
  for (int c = 0; c < 8; ++c) { x[c] = a + 0.125f * c; s[c] = 0.0f; }
  for (int i = 0; i < 128; ++i) {
    for (int c = 0; c < 8; ++c) {
      const float d = __fsub_rn(x[c], b);
      s[c] = __fadd_rn(s[c], __fmul_rn(d, d));
      x[c] = d;
    }
  }
  float total = 0.0f;
  for (int c = 0; c < 8; ++c) total += s[c];
  return total;
}
"""


def device_rates(device):
    """Assumed and measured rates: fp32 terms/s and DRAM bytes/s (None where not known)."""
    rates = {"assumed_terms_per_s": None, "measured_terms_per_s": None, "assumed_bytes_per_s": None,
             "measured_bytes_per_s": None, "notes": []}
    if device != "cuda":
        return rates
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    lanes = FP32_LANES.get((props.major, props.minor), 128)
    clock_hz = props.clock_rate * 1e3
    rates["assumed_terms_per_s"] = props.multi_processor_count * lanes * clock_hz / TERM_INSTRUCTIONS
    rates["assumed_bytes_per_s"] = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
    rates["notes"].append(f"assumed: {props.multi_processor_count} SMs x {lanes} fp32 lanes x {clock_hz / 1e9:.2f} GHz "
                          f"/ {TERM_INSTRUCTIONS} = {rates['assumed_terms_per_s'] / 1e12:.2f} T terms/s; DRAM "
                          f"{rates['assumed_bytes_per_s'] / 1e12:.2f} TB/s (2 x memory clock x bus width)")
    try:
        probe = torch.cuda.jiterator._create_jit_fn(PROBE_CODE)
        a = torch.rand(1 << 24, device="cuda")
        b = torch.full_like(a, 1e-3)
        ms, _ = per_call_ms(lambda: probe(a, b), "cuda")
        rates["measured_terms_per_s"] = a.numel() * PROBE_STEPS * PROBE_CHAINS / (ms * 1e-3)
    except Exception as error:  # NVRTC missing or failing: the assumed rate only
        rates["notes"].append(f"the elementwise fp32 probe failed: {type(error).__name__}: {error}")
    source = torch.empty(1 << 28, device="cuda")
    target = torch.empty_like(source)
    ms, _ = per_call_ms(lambda: target.copy_(source), "cuda")
    rates["measured_bytes_per_s"] = 2 * source.numel() * 4 / (ms * 1e-3)
    del source, target
    measured = rates["measured_terms_per_s"]
    rates["notes"].append(f"measured in this run: {measured / 1e12:.2f} T terms/s (elementwise chain)" if measured
                          else "measured: no fp32 probe")
    rates["notes"].append(f"measured in this run: {rates['measured_bytes_per_s'] / 1e12:.2f} TB/s (copy)")
    return rates


def floors(case: Case, row: Row, features, logits, rates):
    """(kind, floor at the assumed rate, floor at the measured rate) in ms."""
    outputs = 0 if case.op == "profile" else case.batch * case.attributes * (2 * case.k * 8 + 1)
    if case.op == "profile":
        moved = case.batch * case.attributes * 8 + case.attributes * case.classes * 10
    elif case.op == "class":
        moved = logits.numel() * logits.element_size() + case.batch * case.attributes * 8 + outputs
    else:
        moved = features.numel() * features.element_size() + case.batch * case.attributes * 8 + outputs

    def ms(amount, rate):
        return None if rate is None else amount / rate * 1e3

    memory = (ms(moved, rates["assumed_bytes_per_s"]), ms(moved, rates["measured_bytes_per_s"]))
    if case.op != "instance":
        return "memory", *memory
    terms = row.anchors * case.batch * case.dim
    compute = (ms(terms, rates["assumed_terms_per_s"]), ms(terms, rates["measured_terms_per_s"]))
    pick = [max(c, m) if c is not None and m is not None else c for c, m in zip(compute, memory)]
    kind = "fp32" if compute[0] is None or memory[0] is None or compute[0] >= memory[0] else "memory"
    return kind, *pick


# ---- the report --------------------------------------------------------------------------------------------


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}g}"


def write_report(out, meta, rows, skipped):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**meta, "rows": [asdict(r) for r in rows], "skipped": skipped}, f, indent=1)
    lines = [f"# Mining and profiling ops against their floors ({meta['device']})", "",
             f"{meta['date']}, torch {meta['torch']}, crl_ops {meta['crl_ops']}.", ""]
    lines += [f"- {note}" for note in meta["rates"]["notes"]]
    lines += ["", "fraction = floor / time, at the assumed rate and at the rate measured in this run.", "",
              "| case | ms | spread | anchors | lists | floor | floor ms | fraction | measured floor ms | fraction |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.ms:.4g} | {r.spread_ms:.2g} | {r.anchors} | {r.active_lists} | {r.floor_kind} | "
                     f"{fmt(r.floor_ms)} | {fmt(r.fraction, 2)} | {fmt(r.practical_floor_ms)} | "
                     f"{fmt(r.practical_fraction, 2)} |")
    if skipped:
        lines += ["", "Skipped (budget): " + ", ".join(skipped)]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="mining-bench")
    parser.add_argument("--budget-seconds", type=float, default=80.0)
    args = parser.parse_args()
    _native.require(torch.device(args.device))
    started = time.perf_counter()
    rates = device_rates(args.device)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "crl_ops": getattr(crl_ops, "__version__", "?"), "rates": rates,
            "threads": torch.get_num_threads()}
    for note in rates["notes"]:
        print(note, flush=True)
    cases = cases_for(args.device)
    rows, skipped = [], []
    progress = tqdm(cases, unit="case", dynamic_ncols=True) if tqdm else cases
    say = tqdm.write if tqdm else print
    for case in progress:
        if time.perf_counter() - started > args.budget_seconds:
            skipped.append(case.name)
            continue
        features, logits, labels, num_classes = make_inputs(case, args.device)
        call = op_call(case, features, logits, labels, num_classes)
        ms, spread = per_call_ms(call, args.device)
        row = Row(case.name, case.op, case.batch, case.attributes, case.classes, case.dim, case.k, ms, spread)
        if case.op != "profile":
            anchors, _ = call()
            row.anchors = int(anchors.sum())
        if case.op != "instance":
            _, _, active = torch.ops.crl_ops.profile(labels, num_classes, case.classes, THRESHOLD, False)
            row.active_lists = int(active.sum())
        row.floor_kind, row.floor_ms, row.practical_floor_ms = floors(case, row, features, logits, rates)
        row.fraction = None if row.floor_ms is None else row.floor_ms / ms
        row.practical_fraction = None if row.practical_floor_ms is None else row.practical_floor_ms / ms
        rows.append(row)
        say(f"{case.name:40} {ms:9.4f} ms  floor {fmt(row.floor_ms):>7} ms ({row.floor_kind}, "
            f"{fmt(row.fraction, 2)} of it; measured rate: {fmt(row.practical_fraction, 2)})")
        write_report(args.out, meta, rows, skipped)
        del features, logits, labels, num_classes, call
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_report(args.out, meta, rows, skipped)
    print(f"{len(rows)} rows, {len(skipped)} skipped, {time.perf_counter() - started:.0f} s; "
          f"{os.path.join(args.out, 'results.md')}", flush=True)


if __name__ == "__main__":
    main()
