"""Writes a run's results: results.json, results.md (tables) and PNG plots."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

from . import floor
from .implementations import COVERAGE, IMPLEMENTATIONS, LABELS, RELATIVE_TOLERANCE, VARIANTS

CONFIG_ORDER = ("celeba", "xdomain", "large")
CONFIG_TITLES = {"celeba": "CelebA-like", "xdomain": "X-Domain-like", "large": "large"}
SWEPT = ("B", "A", "D", "K", "C")
STATUS_CELLS = {
    "oom": "OOM",
    "oom-estimate": "OOM (est.)",
    "too-slow": "slow (est.)",
    "budget": "budget",
    "mismatch": "mismatch",
    "different-function": "n/a",
    "unavailable": "n/a",
    "error": "error",
}


def write(out_dir: str, results: dict, plots: bool = True) -> List[str]:
    """Writes results.json, results.md and (if `plots`) the PNG plots; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(results))
    return paths + (draw_plots(out_dir, results) if plots else [])


# ---- formatting -------------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def format_bytes(size: Optional[int]) -> str:
    if size is None:
        return "-"
    if size < 2**20:
        return f"{size / 2**10:.0f} KiB"
    if size < 2**30:
        return f"{size / 2**20:.3g} MiB"
    return f"{size / 2**30:.3g} GiB"


def _cell(record: Optional[dict], key: str = "total") -> str:
    if record is None:
        return "-"
    if record["status"] == "ok":
        return format_seconds(record[key]["median"])
    return STATUS_CELLS.get(record["status"], record["status"])


def _speedup(native: Optional[dict], other: Optional[dict]) -> str:
    if not (native and other and native["status"] == other["status"] == "ok"):
        return "-"
    return f"{other['total']['median'] / native['total']['median']:.3g}x"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _by_config(records: List[dict]) -> Dict[tuple, dict]:
    """(config, variant, impl) -> record."""
    table = {}
    for r in records:
        for tag in r["tags"]:
            if tag.startswith("config:"):
                table[(tag[len("config:"):], r["variant"], r["impl"])] = r
    return table


def _sweep(records: List[dict], parameter: str) -> Dict[str, Dict[str, Dict[int, dict]]]:
    """variant -> impl -> swept value -> record."""
    table = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if f"sweep:{parameter}" in r["tags"]:
            table[r["variant"]][r["impl"]][r["shape"][parameter]] = r
    return table


def _impls(results: dict) -> List[str]:
    return [i for i in IMPLEMENTATIONS if i in results["settings"]["impls"]]


def _variants(results: dict) -> List[str]:
    return [v.name for v in VARIANTS if v.name in results["settings"]["variants"]]


# ---- arithmetic floors ------------------------------------------------------------------------------

def rates(results: dict) -> Optional[floor.Rates]:
    """The plain loops' rates of the run: the faster of its start and end measurements (the stricter floor)."""
    measured = [r for r in (results.get("rates") or {}).values() if r]
    if not measured:
        return None
    fastest = {key: max(r[key] for r in measured) for key in ("distance_terms", "exps", "read_bytes")}
    return floor.Rates(**fastest, method=measured[0]["method"])


def floors(record: Optional[dict], run_rates: Optional[floor.Rates]) -> Optional[dict]:
    """A native record's floors (seconds), its measured times and their fractions of the floors."""
    if not (record and run_rates and record["status"] == "ok" and "work" in record):
        return None
    work = floor.Work(**record["work"])
    out = floor.floors(work, run_rates, record.get("distance_terms_rate"))
    out["step_fraction"] = out["step"] / record["total"]["median"]
    if "mining" in record and out["mining"] > 0:
        out["mining_seconds"] = record["mining"]["median"]
        out["mining_fraction"] = out["mining"] / out["mining_seconds"]
        if work.mining_terms:
            out["mining_terms_per_second"] = work.mining_terms / out["mining_seconds"]
    return out


def format_fraction(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"


def _rates_line(results: dict) -> str:
    run_rates = rates(results)
    if run_rates is None:
        return "The plain loops' rates could not be measured (no C compiler), so no floors are given.\n"
    measured = {when: r for when, r in (results.get("rates") or {}).items() if r}
    spread = ", ".join(f"{when}: {r['distance_terms'] / 1e9:.3g}" for when, r in measured.items())
    next_to = sorted(r["distance_terms_rate"] for r in results["records"] if "distance_terms_rate" in r)
    beside = (f"; next to the cases (median per case) {next_to[0] / 1e9:.3g} to {next_to[-1] / 1e9:.3g} G/s"
              if next_to else "")
    return (f"Rates of the plain loops ({run_rates.method}), best of a quiet moment at the start and the end: "
            f"{run_rates.distance_terms / 1e9:.3g} G distance terms/s ({spread}{beside}), "
            f"{run_rates.exps / 1e6:.3g} M exponentials/s, {run_rates.read_bytes / 1e9:.3g} GB/s read.\n")


def _floor_table(results: dict) -> str:
    run_rates = rates(results)
    rows = []
    for config, variant, impl, r in _config_records(results):
        f = floors(r, run_rates) if impl == "native" else None
        if f is None:
            continue
        rows.append([CONFIG_TITLES[config], variant, format_seconds(r["total"]["median"]), format_seconds(f["step"]),
                     format_fraction(f["step_fraction"]),
                     format_seconds(f["mining_seconds"]) if "mining_seconds" in f else "-",
                     format_seconds(f["mining"]), format_fraction(f.get("mining_fraction")),
                     f"{f['mining_terms_per_second'] / 1e9:.3g} G/s" if "mining_terms_per_second" in f else "-"])
    header = ["config", "variant", "native fwd+bwd", "step floor", "of floor", "mining", "mining floor", "of floor",
              "mining distance terms"]
    return _table(header, rows)


def floor_summary(results: dict) -> str:
    """The range of the native kernels' fractions of their floors, for steps and for instance mining."""
    run_rates = rates(results)
    steps, instance = [], []
    for r in results["records"]:
        f = floors(r, run_rates) if r["impl"] == "native" else None
        if f is None:
            continue
        steps.append(f["step_fraction"])
        if r["variant"].startswith("instance") and "mining_fraction" in f:
            instance.append(f["mining_fraction"])
    if not steps:
        return "No floors (no native case timed, or no rates)."
    text = f"Native steps reach {format_fraction(min(steps))} to {format_fraction(max(steps))} of their floors"
    if instance:
        text += (f"; instance mining {format_fraction(min(instance))} to {format_fraction(max(instance))} "
                 f"(within {1 / min(instance):.2f}x of its floor in every case)")
    return text + "."


# ---- markdown ---------------------------------------------------------------------------------------

def headline_table(results: dict) -> str:
    """Forward + backward median per config, variant and implementation, and the native speedups."""
    impls = _impls(results)
    configs = _by_config(results["records"])
    others = [i for i in impls if i != "native"]
    header = ["config", "variant"] + [LABELS[i] for i in impls]
    if "native" in impls:
        header += [f"native vs {LABELS[i]}" for i in others]
    rows = []
    for config in CONFIG_ORDER:
        for variant in _variants(results):
            if not any((config, variant, i) in configs for i in impls):
                continue
            row = [CONFIG_TITLES[config], variant] + [_cell(configs.get((config, variant, i))) for i in impls]
            if "native" in impls:
                row += [_speedup(configs.get((config, variant, "native")), configs.get((config, variant, i)))
                        for i in others]
            rows.append(row)
    return _table(header, rows)


def _memory_table(results: dict) -> str:
    impls = _impls(results)
    configs = _by_config(results["records"])
    rows = []
    for config in CONFIG_ORDER:
        for variant in _variants(results):
            cells = [configs.get((config, variant, i)) for i in impls]
            if any(cells):
                rows.append([CONFIG_TITLES[config], variant] + [
                    format_bytes(c.get("peak_memory_bytes")) if c and c["status"] == "ok" else _cell(c) for c in cells])
    return _table(["config", "variant"] + [LABELS[i] for i in impls], rows)


def noise_summary(results: dict) -> str:
    """How far apart the two timing rounds of the same case are."""
    gaps = sorted(abs(a - b) / min(a, b) for r in results["records"] + results.get("training_step", [])
                  if r["status"] == "ok" and len(r["round_medians"]) == 2 for a, b in [r["round_medians"]])
    if not gaps:
        return "No case was timed twice."
    return (f"The two rounds' medians of the same case differ by {100 * gaps[len(gaps) // 2]:.0f}% (median over "
            f"{len(gaps)} cases), {100 * gaps[int(0.9 * (len(gaps) - 1))]:.0f}% at the 90th percentile and "
            f"{100 * gaps[-1]:.0f}% at most.")


def _config_records(results: dict):
    """(config, variant, implementation, record) of every config case, in table order."""
    configs = _by_config(results["records"])
    for config in CONFIG_ORDER:
        for variant in _variants(results):
            for impl in _impls(results):
                r = configs.get((config, variant, impl))
                if r is not None:
                    yield config, variant, impl, r


def _details_table(results: dict) -> str:
    rows = []
    for config, variant, impl, r in _config_records(results):
        if r["status"] != "ok":
            continue
        first, second = r["round_medians"] + [None] * (2 - len(r["round_medians"]))
        rounds = format_seconds(first) + (f" / {format_seconds(second)}" if second else "")
        spread = lambda k: f"{format_seconds(r[k]['median'])} [{format_seconds(r[k]['q1'])}, {format_seconds(r[k]['q3'])}]"  # noqa: E731
        rows.append([CONFIG_TITLES[config], variant, LABELS[impl], spread("forward"), spread("backward"),
                     spread("total"), rounds, str(r["total"]["n"]), format_bytes(r.get("peak_memory_bytes"))])
    header = ["config", "variant", "implementation", "forward", "backward", "fwd+bwd", "round 1 / round 2",
              "repeats", "peak memory"]
    return _table(header, rows)


def _equality_table(results: dict) -> str:
    rows = []
    for config, variant, impl, r in _config_records(results):
        if "loss" not in r:
            continue
        verdict = {"mismatch": "differs", "different-function": "different function"}.get(
            r["status"], "agrees")
        rows.append([CONFIG_TITLES[config], variant, LABELS[impl], f"{r['loss']:.7g}",
                     f"{r['relative_difference']:.1e} vs {r['baseline']}", verdict])
    return _table(["config", "variant", "implementation", "loss", "relative difference", "verdict"], rows)


def _sweep_tables(results: dict, parameter: str) -> str:
    table = _sweep(results["records"], parameter)
    impls = _impls(results)
    run_rates = rates(results)
    text = ""
    for variant in _variants(results):
        if variant not in table:
            continue
        values = sorted({v for per_impl in table[variant].values() for v in per_impl})
        header = ([parameter] + [f"{LABELS[i]} time" for i in impls] + [f"{LABELS[i]} peak" for i in impls]
                  + ["native of floor", "native mining", "mining of floor"])
        rows = []
        for value in values:
            cells = [table[variant][i].get(value) for i in impls]
            f = floors(table[variant].get("native", {}).get(value), run_rates) or {}
            rows.append([str(value)] + [_cell(c) for c in cells]
                        + [format_bytes(c.get("peak_memory_bytes")) if c and c["status"] == "ok" else "-"
                           for c in cells]
                        + [format_fraction(f.get("step_fraction")),
                           format_seconds(f["mining_seconds"]) if "mining_seconds" in f else "-",
                           format_fraction(f.get("mining_fraction"))])
        text += (f"\n**{variant}**, forward + backward median, peak memory, and the native kernels' fraction of "
                 "their floors:\n\n" + _table(header, rows))
    return text


def training_table(results: dict) -> str:
    steps = results.get("training_step", [])
    base = next((s for s in steps if s["backend"] == "ce" and s["status"] == "ok"), None)
    rows = []
    for s in steps:
        if s["status"] != "ok":
            rows.append([s["objective"], STATUS_CELLS.get(s["status"], s["status"]), "-", "-", "-"])
            continue
        rounds = " / ".join(format_seconds(m) for m in s["round_medians"])
        overhead = "-"
        if base and s is not base:
            overhead = f"{100 * (s['total']['median'] / base['total']['median'] - 1):+.1f}%"
        spread = f"{format_seconds(s['total']['median'])} [{format_seconds(s['total']['q1'])}, {format_seconds(s['total']['q3'])}]"
        rows.append([s["objective"], spread, format_seconds(s["forward"]["median"]), rounds, overhead])
    return _table(["objective", "step time [IQR]", "forward + loss", "round 1 / round 2", "vs CE only"], rows)


def _skipped(results: dict) -> str:
    """One line per case and reason, naming the implementations it applies to."""
    impls_by_reason = defaultdict(list)
    for r in results["records"]:
        if r["status"] not in ("ok", "different-function"):
            impls_by_reason[(r["shape_text"], r["variant"], r["status"], r["reason"])].append(LABELS[r["impl"]])
    lines = [f"- {shape} {variant}, {', '.join(names)}: {STATUS_CELLS.get(status, status)} ({reason})"
             for (shape, variant, status, reason), names in impls_by_reason.items()]
    return "\n".join(lines) + "\n" if lines else "Nothing.\n"


def markdown(results: dict) -> str:
    m, s = results["metadata"], results["settings"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    text = [
        f"# crl-ops benchmark: {s['device']}, {'full' if s['full'] else 'quick'} run\n",
        f"{m['date']} on {m['hostname']} ({m['cpu']}, {m['cpu_count']} CPUs{gpu}); torch {m['torch']}, "
        f"{m['threads']} torch threads; crl-ops {m['crl_ops']} (native kernels: CPU {m['native_cpu']}, "
        f"CUDA {m['native_cuda']}); pytorch-metric-learning {m['pml']}; git {m['git']}. "
        f"Command: `{s['command']}`, {results['elapsed_seconds']:.0f} s; 1-minute load average "
        f"{results['load_average']['start'][0]:.1f} at the start, {results['load_average']['end'][0]:.1f} at the end.\n",
        "Times are medians of two interleaved rounds (each at least "
        f"{s['min_repeats']} repeats and {s['min_seconds']} s, after a warm-up call), forward and backward timed "
        f"separately ({s['clock']}); [q1, q3] is the interquartile range, and the two round medians show the "
        f"noise. Seed {s['seed']}; float32. Loss values are checked against the reference (relative tolerance "
        f"{RELATIVE_TOLERANCE:g}) before timing. Peak memory: {s['memory_method']}. "
        + ("Cases larger than the memory cap "
           f"({format_bytes(s['memory_cap_bytes'])}, by an estimate extrapolated from smaller batches) are marked "
           "OOM (est.) and not run. " if s["memory_cap_bytes"] else "")
        + f"Cases estimated over {s['max_call_seconds']:g} s per call are marked slow (est.). "
        + noise_summary(results) + "\n",
        "## Forward + backward, median (speedup of the native kernels)\n",
        headline_table(results),
        "\n## Arithmetic floors\n",
        "A case's floor is the time its operations would take at the rates of plain vectorised loops measured in "
        "this run (benchmarks/floor.py): instance mining's anchors x B x D distance terms, class mining's "
        "exponentials, the loss's 3 x pairs x D distance terms, and the bytes the step must read and write; "
        "the fraction is floor / measured time. Mining is `crl_ops.mine` (the native kernels, default settings), "
        "timed in the same rounds, and so is the plain distance loop, whose median rate next to a case gives that "
        "case's floors (the machine's load then weighs on both alike). " + _rates_line(results),
        _floor_table(results),
        "\n" + floor_summary(results) + "\n",
        "\n## Peak memory of one forward + backward\n",
        _memory_table(results),
        "\n## Training step: a DeepID2-sized network (40 x 64-d features, binary logits), batch 128, SGD\n",
        training_table(results),
        "\n## Forward and backward\n",
        _details_table(results),
        "\n## Loss values\n",
        _equality_table(results),
    ]
    for parameter in SWEPT:
        tables = _sweep_tables(results, parameter)
        if tables:
            text += [f"\n## Scaling in {parameter}\n", tables]
    text += ["\n## What each implementation computes\n",
             "\n".join(f"- **{LABELS[i]}**: {COVERAGE[i]}" for i in _impls(results)) + "\n",
             "\n## Not measured\n", _skipped(results)]
    return "\n".join(text)


# ---- plots ------------------------------------------------------------------------------------------

def draw_plots(out_dir: str, results: dict) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for parameter in SWEPT:
        for quantity in ("time", "memory"):
            path = _sweep_plot(plt, out_dir, results, parameter, quantity)
            if path:
                written.append(path)
    paths = [_speedup_plot(plt, out_dir, results), _floor_plot(plt, out_dir, results)]
    return written + [p for p in paths if p]


def _floor_plot(plt, out_dir, results) -> Optional[str]:
    """The native kernels' fraction of their floors along each sweep: steps solid, mining dashed."""
    run_rates = rates(results)
    panels = []
    for parameter in SWEPT:
        lines = []
        for variant, per_impl in sorted(_sweep(results["records"], parameter).items()):
            points = sorted((value, floors(r, run_rates)) for value, r in per_impl.get("native", {}).items())
            points = [(value, f) for value, f in points if f]
            if points:
                lines.append((variant, points))
        if lines:
            panels.append((parameter, lines))
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (parameter, lines) in zip(axes.flat, panels):
        for variant, points in lines:
            values = [v for v, _ in points]
            line, = ax.plot(values, [100 * f["step_fraction"] for _, f in points], "o-", label=f"{variant} step")
            mined = [(v, f["mining_fraction"]) for v, f in points if "mining_fraction" in f]
            if mined:
                ax.plot([v for v, _ in mined], [100 * m for _, m in mined], "s--", color=line.get_color(),
                        label=f"{variant} mining")
        ax.set_xscale("log", base=2 if parameter != "C" else 10)
        ax.set_yscale("log")
        ax.axhline(100 / 3, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(parameter)
        ax.set_ylabel("% of the arithmetic floor")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(figure, f"Native kernels against their floors ({results['settings']['device']}; dotted: 1/3)",
                 os.path.join(out_dir, "floor_fraction.png"))



def _save(figure, title: str, path: str) -> str:
    """Titles, lays out, writes and closes a figure; returns its path."""
    import matplotlib.pyplot as plt  # imported already by the caller, which made the figure

    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

def _first_failure(per_value: Dict[int, dict]) -> str:
    for value in sorted(per_value):
        r = per_value[value]
        if r["status"] in ("oom", "oom-estimate", "too-slow", "budget"):
            return f" ({STATUS_CELLS[r['status']]} from {value})"
    return ""


def _sweep_plot(plt, out_dir, results, parameter: str, quantity: str) -> Optional[str]:
    table = _sweep(results["records"], parameter)
    variants = [v for v in _variants(results) if v in table]
    if not variants:
        return None
    columns = min(3, len(variants))
    rows = (len(variants) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax, variant in zip(axes.flat, variants):
        for impl in _impls(results):
            points = [(v, r) for v, r in sorted(table[variant][impl].items()) if r["status"] == "ok"]
            if not points:
                continue
            ys = [r["total"]["median"] if quantity == "time" else r.get("peak_memory_bytes") or None for _, r in points]
            ax.plot([v for v, _ in points], ys, "o-", label=LABELS[impl] + _first_failure(table[variant][impl]))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(variant)
        ax.set_xlabel(parameter)
        ax.set_ylabel("forward + backward (s)" if quantity == "time" else "peak memory (bytes)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    return _save(figure, f"CRL {quantity} vs {parameter} ({results['settings']['device']})",
                 os.path.join(out_dir, f"{quantity}_vs_{parameter}.png"))


def _speedup_plot(plt, out_dir, results) -> Optional[str]:
    configs = _by_config(results["records"])
    others = [i for i in _impls(results) if i != "native"]
    present = [c for c in CONFIG_ORDER if any(k[0] == c for k in configs)]
    if "native" not in _impls(results) or not present or not others:
        return None
    variants = _variants(results)
    figure, axes = plt.subplots(1, len(present), figsize=(6 * len(present), 4.5), squeeze=False)
    width = 0.8 / len(others)
    for ax, config in zip(axes.flat, present):
        for n, impl in enumerate(others):
            heights = []
            for variant in variants:
                native, other = configs.get((config, variant, "native")), configs.get((config, variant, impl))
                ok = native and other and native["status"] == other["status"] == "ok"
                heights.append(other["total"]["median"] / native["total"]["median"] if ok else float("nan"))
            ax.bar([v + n * width for v in range(len(variants))], heights, width, label=f"vs {LABELS[impl]}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([v + width * (len(others) - 1) / 2 for v in range(len(variants))])
        ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup of native (forward + backward)")
        ax.set_title(CONFIG_TITLES[config])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(figure, f"Native kernels' speedup ({results['settings']['device']})",
                 os.path.join(out_dir, "speedup.png"))
