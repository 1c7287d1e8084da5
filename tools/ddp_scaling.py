"""Per-rank cost of CRL(distributed=True) for a fixed global batch on 1, 2 and 4 gloo ranks (CPU).

    python tools/ddp_scaling.py [--ranks 1 2 4] [--batch 2048] [--out DIR]   # DIR/results.{json,md}, scaling.png
    python tools/ddp_scaling.py --against old_distributed.py   # also another crl_ops/distributed.py, interleaved

Every rank runs one thread and holds batch/W samples of the same global batch (binary attributes
with minority fractions from 5% to 40%); the baseline is one process computing the whole batch
with distributed=False (the fused native op). The cases run in rounds (--rounds), each case once per
round in fresh processes, and a ratio is to the one process of the same round: the machine's speed
drifts between minutes, which a ratio of two separate invocations would mix in. Per rank and step
(forward + backward of CRL alone):

- CPU time of the rank's process (time.process_time: all its threads, gloo's included), median
  over the timed steps, not wall time: the ranks share the machine's cores, and when there are more
  ranks than cores wall time measures the scheduler. Oversubscription still inflates the part
  spent inside collectives (a rank that waits for a descheduled peer spins or sleeps in gloo), so
  it is reported apart: CPU time between the issue and the end of each collective, from a
  separate instrumented step.
- bytes: the payload handed to each collective (input tensors), counted by a TorchDispatchMode on
  an instrumented step, against the formula of docs/scaling.md, and the bytes a rank sends with
  ring algorithms ((W-1) x payload for an all-gather, (W-1)/W x input for a reduce-scatter,
  2 (W-1)/W x payload for an all-reduce).
- peak memory: growth of the process's peak resident set (getrusage ru_maxrss) from just before
  the first CRL step to the end: the largest step's tensors and the allocator's cache.
"""
import argparse
import datetime
import importlib.util
import inspect
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import crl_ops

VARIANTS = {  # name: (CRL arguments, batch_sizes)
    "instance-relative": (dict(mode="instance", form="relative"), "equal"),
    "instance-relative (sizes gathered)": (dict(mode="instance", form="relative"), "gathered"),
    "class-relative": (dict(mode="class", form="relative"), "equal"),
    "instance-distribution": (dict(mode="instance", form="distribution"), "equal"),
}
# dispatched op -> (kind, where its input is): the functional collectives (torch.compile), the
# c10d ones crl_ops.distributed calls eagerly, and those older versions of it called
# (torch.distributed.all_gather, all_reduce: lists of tensors)
COLLECTIVES = {"all_gather_into_tensor": ("all_gather", 0), "_allgather_base_": ("all_gather", 1),
               "allgather_": ("all_gather", (1, 0)), "reduce_scatter_tensor": ("reduce_scatter", 0),
               "_reduce_scatter_base_": ("reduce_scatter", 1), "all_reduce": ("all_reduce", 0),
               "allreduce_": ("all_reduce", (0, 0))}


def make_crl(arguments, batch_sizes, distributed, backend):
    return crl_ops.CRL(backend=backend, distributed=distributed, batch_sizes=batch_sizes, **arguments)


def global_batch(size, attributes, dim):
    g = torch.Generator().manual_seed(0)
    minority = torch.linspace(0.05, 0.4, attributes)
    labels = (torch.rand(size, attributes, generator=g) < minority).long()
    return torch.randn(size, attributes, dim, generator=g), torch.randn(size, attributes, generator=g), labels


class PayloadLog(TorchDispatchMode):
    """While active: the payload bytes of every collective (the size of its input), the other
    dispatched ops but views and the autograd seed (the collectives' output buffers among them),
    and the host reads of tensor values."""

    def __init__(self):
        super().__init__()
        self.bytes = {}
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in COLLECTIVES:
            kind, where = COLLECTIVES[name]
            payload = args[where] if isinstance(where, int) else args[where[0]][where[1]]
            self.bytes[kind] = self.bytes.get(kind, 0) + payload.numel() * payload.element_size()
        elif name == "_local_scalar_dense":
            self.host_reads += 1
        elif not (func.is_view or name == "ones_like" or "c10d" in str(func)):
            self.ops += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.tolist = torch.Tensor.tolist
        log = self

        def counted_tolist(tensor):  # reads values on the host without dispatching an op
            log.host_reads += 1
            return log.tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


class CollectiveTimer:
    """Process CPU time spent inside crl_ops.distributed's collectives (its three wrappers, which
    issue and wait), while active; absent wrappers (another implementation): None."""

    WRAPPERS = ("_all_gather", "_reduce_scatter", "_all_reduce")

    def __init__(self):
        self.seconds = 0.0
        module = sys.modules.get("crl_ops.distributed") or importlib.import_module("crl_ops.distributed")
        self.available = module is not None and all(hasattr(module, name) for name in self.WRAPPERS)
        if self.available:
            for name in self.WRAPPERS:
                setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, collective):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return collective(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start

        return timed


def formula_bytes(world, rows, attributes, dim, mode, form, bins, k, batch_sizes, dtype_size=4):
    """Payload per rank and step of crl_ops.distributed (docs/scaling.md), by collective kind, for
    binary [B, A] logits (C_max = 2): the rows (vectors, labels, logits, padded to whole 8-byte
    words) in one all-gather; the partial sums, pair counts and three flags in float64. Class mode,
    where the partner table [2 C_max K, A, D] is smaller than the gathered vectors: no vectors in
    the all-gather and no reduce-scatter, the table all-reduced forward and its gradient backward."""
    sums = attributes * 2 * bins if form == "distribution" else 2 * attributes
    table = 2 * 2 * k * attributes * dim * dtype_size
    partner_rows = mode == "class" and 2 * 2 * k < world * rows
    row = (0 if partner_rows else attributes * dim * dtype_size) + attributes * 8 + attributes * dtype_size
    return {
        "all_gather": rows * (row + -row % 8) + (16 if batch_sizes == "gathered" else 0),
        "all_reduce": (sums + 4 * attributes + 3) * 8 + (attributes * dtype_size if form == "distribution" else 0)
        + (2 * table if partner_rows else 0),
        "reduce_scatter": 0 if partner_rows else world * rows * attributes * dim * dtype_size,
    }


def sent_bytes(world, payload):
    """Bytes a rank sends with ring algorithms, from the payload per collective kind."""
    factor = {"all_gather": world - 1, "reduce_scatter": (world - 1) / world,
              "all_reduce": 2 * (world - 1) / world}
    return sum(factor.get(kind, 0) * size for kind, size in payload.items())


def measure_rank(crl, features, logits, labels, steps, warmup=2):
    timer = CollectiveTimer()
    features = features.clone().requires_grad_()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(warmup):
        crl(features, logits, labels).backward()
    cpu, wall, inside = [], [], []
    for _ in range(steps):
        timer.seconds = 0.0
        c, w = time.process_time(), time.perf_counter()
        crl(features, logits, labels).backward()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
        inside.append(timer.seconds)
    log = PayloadLog()
    with log:
        crl(features, logits, labels).backward()
    return {"cpu_ms": 1e3 * statistics.median(cpu), "cpu_spread_ms": 1e3 * (max(cpu) - min(cpu)),
            "wall_ms": 1e3 * statistics.median(wall),
            "collective_cpu_ms": 1e3 * statistics.median(inside) if timer.available else None,
            "compute_cpu_ms": 1e3 * statistics.median(c - i for c, i in zip(cpu, inside)),
            "payload_bytes": log.bytes, "ops": log.ops, "host_reads": log.host_reads,
            "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024}


def _use_implementation(path):
    """Replaces crl_ops.distributed by the module in `path` (another version of it)."""
    spec = importlib.util.spec_from_file_location("crl_ops.distributed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["crl_ops.distributed"] = module
    spec.loader.exec_module(module)
    crl_ops.distributed = module
    loss = module.class_rectification_loss
    if len(inspect.signature(loss).parameters) == 3:  # before the caller was part of the layout
        module.class_rectification_loss = lambda options, margin, batch, caller="CRL": loss(options, margin, batch)


def _worker(rank, world, store, args, variant, implementation, out_path):
    """One case in a fresh process (the peak RSS is per process); world 0: one process, distributed=False."""
    torch.set_num_threads(1)
    if implementation:
        _use_implementation(implementation)
    features, logits, labels = global_batch(args.batch, args.attributes, args.dim)
    arguments, batch_sizes = VARIANTS[variant]
    crl = make_crl(dict(arguments, k=args.k, bins=args.bins), batch_sizes, world > 0, args.backend)
    if world == 0:
        torch.save(measure_rank(crl, features, logits, labels, args.steps), f"{out_path}.rank0")
        return
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    rows = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    torch.save(measure_rank(crl, features[rows], logits[rows], labels[rows], args.steps), f"{out_path}.rank{rank}")
    dist.destroy_process_group()


def _case_row(args, variant, world, implementation, ranks):
    """The slowest rank's figures of one case in one round."""
    if world == 0:
        return {"variant": variant, "world": "single process", "implementation": None, **ranks[0]}
    arguments, batch_sizes = VARIANTS[variant]
    formula = formula_bytes(world, args.batch // world, args.attributes, args.dim, arguments["mode"],
                            arguments["form"], args.bins, args.k, batch_sizes)
    measured = ranks[0]["payload_bytes"]
    return {
        "variant": variant, "world": world, "implementation": implementation,
        "cpu_ms": max(r["cpu_ms"] for r in ranks),
        "cpu_ms_per_rank": [round(r["cpu_ms"], 2) for r in ranks],
        "collective_cpu_ms": None if ranks[0]["collective_cpu_ms"] is None
        else max(r["collective_cpu_ms"] for r in ranks),
        "compute_cpu_ms": max(r["compute_cpu_ms"] for r in ranks),
        "wall_ms": max(r["wall_ms"] for r in ranks),
        "payload_bytes": measured, "formula_bytes": None if implementation else formula,
        "ops": ranks[0]["ops"], "host_reads": ranks[0]["host_reads"],
        "sent_bytes": sent_bytes(world, measured),
        "peak_rss_growth_mb": max(r["peak_rss_growth_mb"] for r in ranks),
    }


MEDIAN_FIELDS = ("cpu_ms", "collective_cpu_ms", "compute_cpu_ms", "wall_ms", "peak_rss_growth_mb")


def _median_row(rounds):
    """One row from a case's rounds: the median of each time and memory figure, the ratio to the same
    round's one process (median, min, max), and every round's figures."""
    row = dict(rounds[0])
    for field in MEDIAN_FIELDS:
        if rounds[0].get(field) is not None:
            row[field] = statistics.median(r[field] for r in rounds)
    ratios = [r["ratio"] for r in rounds]
    row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
               rounds=[{field: r.get(field) for field in (*MEDIAN_FIELDS, "ratio")} for r in rounds])
    return row


def run(args):
    """Rows of {variant, world, implementation} figures. The cases run in rounds, each case once per
    round in fresh processes, so that a slow spell of the machine touches every case alike: a
    case's ratio is to the one-process time of its own round."""
    implementations = [None] + ([args.against] if args.against else [])
    cases = [(variant, 0, None) for variant in args.variants]
    cases += [(variant, world, implementation) for variant in args.variants for implementation in implementations
              for world in args.ranks]
    rounds = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        progress = tqdm(total=args.rounds * len(cases), desc="cases")
        for round_index in range(args.rounds):
            single = {}
            for i, (variant, world, implementation) in enumerate(cases):
                out_path = os.path.join(tmp, f"round{round_index}-case{i}")
                mp.spawn(_worker, args=(world, f"{out_path}.store", args, variant, implementation, out_path),
                         nprocs=max(world, 1))
                ranks = [torch.load(f"{out_path}.rank{r}") for r in range(max(world, 1))]
                row = _case_row(args, variant, world, implementation, ranks)
                single.setdefault(variant, row["cpu_ms"])
                rounds[(variant, world, implementation)].append(dict(row, ratio=row["cpu_ms"] / single[variant]))
                progress.update()
        progress.close()
    return [_median_row(rounds[case]) for case in cases]


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def command_line():
    """This invocation, without its output folder."""
    argv = sys.argv[1:]
    if "--out" in argv:
        at = argv.index("--out")
        argv = argv[:at] + argv[at + 2:]
    return shlex.join(["python", "tools/ddp_scaling.py", *argv])


def _kib(n):
    return f"{n / 1024:.1f}"


def write(out_dir, args, rows):
    os.makedirs(out_dir, exist_ok=True)
    header = {**machine(), "batch": args.batch, "attributes": args.attributes, "dim": args.dim, "k": args.k,
              "bins": args.bins, "backend": args.backend, "steps": args.steps, "ranks": args.ranks,
              "rounds": args.rounds, "against": args.against}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    load = ", ".join(f"{x:.1f}" for x in header["load_average"])
    lines = [
        f"# CRL(distributed=True) per rank: fixed global batch, {header['date']}",
        "",
        f"`{command_line()}`; {header['cpu']}, {header['cpu_count']} "
        f"cores shared with other jobs (load average at the end {load}); "
        f"torch {header['torch']}, gloo, one thread per rank, backend={args.backend}, float32. Global batch "
        f"B={args.batch}, A={args.attributes} binary attributes, D={args.dim}, K={args.k}"
        f"{f', bins={args.bins}' if any('distribution' in r['variant'] for r in rows) else ''}; CRL alone, "
        "validate=True (the default), forward + backward; ranks hold B/W samples each.",
        "",
        f"Every case ran once in each of {args.rounds} rounds, in fresh processes; a figure is the median over "
        "the rounds, and 'vs one process' the median (min-max) of each round's ratio to the one process of "
        "the same round, so that a slow spell of the machine touches both sides of a ratio alike. "
        "CPU time per step is the process's (all threads), median of "
        f"{args.steps} steps, for the slowest rank, split into the time inside the collectives (issue to "
        "end, gloo's threads included), which oversubscription (more ranks than cores) inflates, and the "
        "rest. Payload: bytes handed to the collectives per rank and step, measured (formula of "
        "docs/scaling.md); sent: what a rank sends with ring algorithms. Peak memory: growth of the "
        "rank's peak RSS over its steps. Ops: dispatched operations per step but views and the autograd seed "
        "(the collectives and their output buffers included); host reads: tensor values read on the host.",
        "",
        "| variant | ranks | distributed.py | CPU ms/step | vs one process | outside collectives | in collectives | wall ms "
        "| ops | host reads | payload KiB (formula) | sent KiB | peak RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["world"] == "single process":
            lines.append(f"| {r['variant']} | one process, distributed=False | - | {r['cpu_ms']:.1f} | 1.00 | "
                         f"{r['cpu_ms']:.1f} | - | {r['wall_ms']:.1f} | {r['ops']} | {r['host_reads']} | - | - | "
                         f"{r['peak_rss_growth_mb']:.1f} |")
            continue
        payload = sum(r["payload_bytes"].values())
        formula = f" ({_kib(sum(r['formula_bytes'].values()))})" if r["formula_bytes"] else ""
        inside = "-" if r["collective_cpu_ms"] is None else f"{r['collective_cpu_ms']:.1f}"
        lines.append(
            f"| {r['variant']} | {r['world']} | {r['implementation'] or 'this checkout'} | {r['cpu_ms']:.1f} | "
            f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
            f"{r['compute_cpu_ms']:.1f} | {inside} | {r['wall_ms']:.1f} | {r['ops']} | {r['host_reads']} | "
            f"{_kib(payload)}{formula} | "
            f"{_kib(r['sent_bytes'])} | {r['peak_rss_growth_mb']:.1f} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out_dir, rows, args)


def plot(out_dir, rows, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        ranks = [r for r in rows if r["variant"] == variant and r["world"] != "single process"
                 and r["implementation"] is None]
        single = next(r for r in rows if r["variant"] == variant and r["world"] == "single process")
        positions = [j + i * width for j in range(len(ranks))]
        compute = [r["compute_cpu_ms"] for r in ranks]
        bars = axes[0].bar(positions, compute, width, label=f"{variant}: outside collectives")
        axes[0].bar(positions, [r["collective_cpu_ms"] or 0.0 for r in ranks], width, bottom=compute, hatch="//",
                    color=bars[0].get_facecolor(), alpha=0.45)
        axes[0].plot(positions, [single["cpu_ms"] / r["world"] for r in ranks], "k_", markersize=18, mew=2)
        against = [r for r in rows if r["variant"] == variant and r["implementation"] and r["world"] != "single process"]
        if against:
            axes[0].plot(positions, [r["cpu_ms"] for r in against], "ko", mfc="none", markersize=6)
        axes[1].plot([r["world"] for r in ranks], [sum(r["payload_bytes"].values()) / 1024 for r in ranks], "o-",
                     label=f"{variant}: payload")
        axes[1].plot([r["world"] for r in ranks], [r["sent_bytes"] / 1024 for r in ranks], "s--",
                     color=axes[1].lines[-1].get_color(), alpha=0.6)
        axes[2].plot([r["world"] for r in ranks], [r["peak_rss_growth_mb"] for r in ranks], "o-", label=variant)
    worlds = [r["world"] for r in rows if r["variant"] == variants[0] and r["world"] != "single process"
              and r["implementation"] is None]
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], [f"W={w}" for w in worlds])
    axes[0].set_ylabel("CPU ms per step, slowest rank")
    axes[0].set_title("per-rank CPU time (hatched: in collectives; black: one process / W;\n"
                      f"circles: {os.path.basename(args.against)}, in all)" if args.against else
                      "per-rank CPU time (hatched: in collectives;\nblack: one process / W)")
    axes[0].set_ylim(0, 1.45 * axes[0].get_ylim()[1])  # room for the legend above the bars
    axes[0].legend(fontsize=7, loc="upper left")
    for ax, label, title in ((axes[1], "KiB per rank and step", "bytes (solid: payload, dashed: sent, ring)"),
                             (axes[2], "MiB", "peak RSS growth per rank")):
        ax.set_xlabel("ranks W")
        ax.set_xticks(worlds)
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"CRL(distributed=True), global batch B={args.batch}, A={args.attributes}, D={args.dim}, gloo on CPU")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=2048, help="global batch size")
    parser.add_argument("--attributes", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--bins", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--backend", default="native", choices=["native", "reference"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all cases, interleaved")
    parser.add_argument("--against", help="another version of crl_ops/distributed.py, measured as well")
    parser.add_argument("--out", default=f"benchmarks/results/tmp/{datetime.date.today().isoformat()}-cpu-ddp")
    args = parser.parse_args()
    if any(args.batch % w for w in args.ranks):
        parser.error("--batch must be divisible by every --ranks value (equal per-rank batches)")
    write(args.out, args, run(args))
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
