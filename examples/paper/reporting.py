"""Tables and plots in the layouts of the paper's Tables 2-4 and Figures 5-6.

- `attribute_table`: attributes as columns sorted by imbalance ratio, a ratio row, one row per
  method and an average column (Tables 2 and 3), in Markdown.
- `variant_table`: the six CRL variants as a 2 x 3 grid (mining level x loss form) of gains (Table 4).
- `plot_gains`: gain over the baseline per attribute against imbalance ratio (Figures 5 and 6).
- `plot_convergence`: mean accuracy against training steps, per dataset and method.
- `plot_diagnostics`: per attribute (by imbalance), the features' norms and the rarest class's
  training recall, per method.

Values are fractions in [0, 1] or (mean, std) pairs of them; tables show percentages.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

Cell = Union[float, Tuple[float, float], None]

_MODES = (("class", "Class level"), ("instance", "Instance level"))
_FORMS = (("absolute", "A"), ("relative", "R"), ("distribution", "D"))


def format_cell(value: Cell, digits: int, signed: bool = False) -> str:
    if value is None:
        return ""
    mean, std = value if isinstance(value, tuple) else (value, None)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    text = f"{100 * mean:+.{digits}f}" if signed else f"{100 * mean:.{digits}f}"
    return text if std is None else f"{text} ± {100 * std:.{digits}f}"


def imbalance_order(ratios: Sequence[float]) -> list:
    """Attribute indices by increasing imbalance ratio (ties in the given order)."""
    return sorted(range(len(ratios)), key=lambda j: (ratios[j], j))


def attribute_table(attributes: Sequence[str], ratios: Sequence[float], rows: Mapping[str, Sequence[Cell]],
                    averages: Optional[Mapping[str, Cell]] = None, digits: int = 1, block: int = 20,
                    signed: bool = False) -> str:
    """Markdown: one block of at most `block` attribute columns after another, sorted by imbalance.

    `rows` maps a method's label to one cell per attribute (in `attributes` order; None leaves the
    cell empty); `averages` gives the last column (printed with the last block only).
    """
    order = imbalance_order(ratios)
    blocks = [order[i:i + block] for i in range(0, len(order), block)]
    lines = []
    for number, columns in enumerate(blocks):
        last = number == len(blocks) - 1
        header = ["Methods", *(attributes[j] for j in columns)] + (["Average"] if last and averages else [])
        ratio_row = ["Imbalance ratio (1:x)", *(f"{ratios[j]:.0f}" for j in columns)] + (
            [""] if last and averages else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(ratio_row) + " |"]
        for label, cells in rows.items():
            row = [label, *(format_cell(cells[j], digits, signed) for j in columns)]
            if last and averages:
                row.append(format_cell(averages.get(label), digits, signed))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def variant_table(gains: Mapping[str, Mapping[Tuple[str, str], Cell]], digits: int = 2) -> str:
    """Markdown in Table 4's layout: `gains[dataset][(mode, form)]`, rows Class/Instance level."""
    datasets = list(gains)
    header = ["Loss function", *(f"{d} {f}" for d in datasets for _, f in _FORMS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode, mode_label in _MODES:
        cells = [format_cell(gains[d].get((mode, form)), digits, signed=True) for d in datasets for form, _ in _FORMS]
        lines.append("| " + " | ".join([mode_label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_gains(path: str, attributes: Sequence[str], ratios: Sequence[float],
               gains: Mapping[str, Sequence[float]], title: str, errors: Optional[Mapping[str, Sequence[float]]] = None,
               baseline: str = "the baseline") -> None:
    """Figures 5/6: per attribute (sorted by imbalance ratio), each method's gain in class-balanced
    accuracy (percentage points) over `baseline`; `errors` adds error bars (e.g. std over seeds)."""
    plt = _pyplot()
    order = imbalance_order(ratios)
    positions = range(len(order))
    count = len(gains)
    width_inches = min(24.0, 4.0 + len(order) * max(0.35, 0.1 * count))
    figure, axes = plt.subplots(figsize=(width_inches, 4.5))
    width = 0.8 / max(count, 1)
    for k, (label, values) in enumerate(gains.items()):
        offsets = [p - 0.4 + width * (k + 0.5) for p in positions]
        error = [100 * errors[label][j] for j in order] if errors and label in errors else None
        axes.bar(offsets, [100 * values[j] for j in order], width, yerr=error, label=label, capsize=1.5,
                 error_kw={"linewidth": 0.6})
    axes.axhline(0, color="black", linewidth=0.7)
    axes.set_xticks(list(positions))
    axes.set_xticklabels([f"{attributes[j]} (1:{ratios[j]:.0f})" for j in order], rotation=60, ha="right", fontsize=8)
    axes.set_ylabel(f"gain over {baseline} (points)")
    axes.set_title(title + "\nclass-balanced accuracy; attributes by increasing imbalance ratio", fontsize=10)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_convergence(path: str, convergence: Mapping, labels: Mapping[str, str]) -> None:
    """One panel per dataset: mean accuracy (± std over seeds) of each method against the steps.

    `convergence[dataset]` has `budgets` (steps), `budget` (the chosen one) and
    `accuracy[method]` = one (mean, std) per budget, None where the method was not run; other
    keys of `convergence` are ignored.
    """
    plt = _pyplot()
    names = [n for n, v in convergence.items() if isinstance(v, Mapping)]
    figure, axes = plt.subplots(1, len(names), figsize=(5.0 * len(names), 3.8), squeeze=False)
    for axis, name in zip(axes[0], names):
        table = convergence[name]
        for method, cells in table["accuracy"].items():
            points = [(b, c) for b, c in zip(table["budgets"], cells) if c]  # None: not run at that budget
            axis.errorbar([b for b, _ in points], [100 * c[0] for _, c in points], yerr=[100 * c[1] for _, c in points],
                          label=labels.get(method, method), marker="o", capsize=2)
        axis.axvline(table["budget"], color="grey", linestyle=":", label="budget")
        axis.set_xscale("log", base=2)
        axis.set_xticks(table["budgets"], [str(b) for b in table["budgets"]])
        axis.set_xlabel("SGD steps (cosine schedule over the whole run)")
        axis.set_ylabel("class-balanced accuracy (%)")
        axis.set_title(name, fontsize=10)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def plot_diagnostics(path: str, attributes: Sequence[str], ratios: Sequence[float],
                     diagnostics: Mapping[str, Mapping], title: str) -> None:
    """Two panels, attributes by increasing imbalance: each method's mean feature norm on the
    training set (`final_feature_norm`) and its training recall of the attribute's rarest class
    (`train_recall_rarest`)."""
    plt = _pyplot()
    order = imbalance_order(ratios)
    ticks = [f"{attributes[j]} (1:{ratios[j]:.0f})" for j in order]
    figure, axes = plt.subplots(1, 2, figsize=(11.0, 4.0))
    panels = (("final_feature_norm", "mean feature norm (training set)", 1.0),
              ("train_recall_rarest", "rarest class: training recall (%)", 100.0))
    for axis, (key, ylabel, scale) in zip(axes, panels):
        for label, values in diagnostics.items():
            axis.plot(range(len(order)), [scale * values[key][j] for j in order], marker="o", label=label)
        axis.set_xticks(range(len(order)), ticks, rotation=45, ha="right", fontsize=8)
        axis.set_ylabel(ylabel)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_gains(runs: Mapping[str, Sequence[Sequence[float]]], baseline: str) -> Dict[str, list]:
    """Per method, per seed, per attribute: method minus baseline of the same seed."""
    reference = runs[baseline]
    return {name: [[v - b for v, b in zip(seed_values, base_values)]
                   for seed_values, base_values in zip(values, reference)]
            for name, values in runs.items() if name != baseline}


def paper_rows(table: Mapping[str, Tuple[Sequence[float], float]], order: Sequence[str], shown: Sequence[str],
               attributes: Sequence[str]) -> Tuple[Dict[str, list], Dict[str, float]]:
    """A paper table's `shown` rows (percentages, columns named by `order`) as fractions in `attributes` order."""
    rows, averages = {}, {}
    for name in shown:
        values, average = table[name]
        by_attribute = dict(zip(order, values))
        rows[f"{name} (paper)"] = [by_attribute[a] / 100 if a in by_attribute else None for a in attributes]
        averages[f"{name} (paper)"] = average / 100
    return rows, averages


def compare_runs(records: Sequence[Mapping], paper: Tuple[Mapping, Mapping] = ({}, {}),
                 baseline: Optional[str] = None, figure: Optional[str] = None, title: str = "") -> str:
    """Markdown comparing training runs (their results.json records) with a paper table's rows.

    Every record has `attributes`, `train_imbalance_ratios`, `method`, `label`, `per_attribute`
    and `mean` (fractions); the first one's attributes and ratios lay out the table. With
    `baseline` (a method name among the records), also the per-attribute gains over it, drawn to
    `figure` (Figures 5/6), and the CRL runs' mean gains in Table 4's layout.
    """
    attributes, ratios = records[0]["attributes"], records[0]["train_imbalance_ratios"]
    rows = {f"{r['label']} (measured)": r["per_attribute"] for r in records}
    averages = {f"{r['label']} (measured)": r["mean"] for r in records}
    rows.update(paper[0])
    averages.update(paper[1])
    text = attribute_table(attributes, ratios, rows, averages)
    if baseline is None:
        return text
    reference = next((r for r in records if r["method"] == baseline), None)
    if reference is None:
        raise ValueError(f"baseline {baseline!r} is not among the runs' methods {[r['method'] for r in records]}")
    others = [r for r in records if r is not reference]
    gains = {r["label"]: [a - b for a, b in zip(r["per_attribute"], reference["per_attribute"])] for r in others}
    mean_gains = {r["label"]: r["mean"] - reference["mean"] for r in others}
    text += f"\nGain over {reference['label']} (points):\n\n" + attribute_table(
        attributes, ratios, gains, mean_gains, signed=True)
    variants = {(r.get("mode"), r.get("form")): r["mean"] - reference["mean"]
                for r in others if r.get("crl") and not r.get("baseline")}
    if variants:
        text += "\nCRL variants, gain in mean accuracy (Table 4 layout):\n\n" + variant_table({"": variants})
    if figure:
        plot_gains(figure, attributes, ratios, gains, title, baseline=reference["label"])
    return text


def write_run_table(record: Mapping, paper: Tuple[Mapping, Mapping], out: Union[str, Path]) -> None:
    """A training script's summary: the run beside the paper's rows, printed and written to OUT/table.md."""
    table = compare_runs([record], paper)
    Path(out, "table.md").write_text(table)
    print(table)
    print(f"class-balanced accuracy {100 * record['mean']:.2f}% ({record['label']}); wrote {out}/results.json, table.md")


def report_main(argv: Optional[Sequence[str]], dataset: str, paper_table: Mapping, paper_order: Sequence[str],
                table_name: str, figure_name: str) -> None:
    """The report scripts' command line: results.json files in, TABLE.md and FIGURE.png out."""
    parser = argparse.ArgumentParser(description=f"Combine {dataset} runs: {table_name} with the paper's rows, "
                                                 f"{figure_name} (gain over the baseline run) and Table 4.")
    parser.add_argument("results", nargs="+", help="results.json files written by train.py")
    parser.add_argument("--baseline", default="ce", help="method name of the baseline run (default: ce)")
    parser.add_argument("--out", required=True, help="folder for the table and the figure")
    args = parser.parse_args(argv)
    records = []
    for path in args.results:
        record = json.loads(Path(path).read_text())
        if record.get("dataset") != dataset:
            parser.error(f"{path} is a result of {record.get('dataset')!r}, not {dataset!r}")
        records.append(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paper = paper_rows(paper_table, paper_order, list(paper_table), records[0]["attributes"])
    figure = out / f"{figure_name.lower().replace(' ', '')}.png"
    text = compare_runs(records, paper, args.baseline, str(figure),
                        title=f"{dataset}: gain over {args.baseline} per attribute ({figure_name} layout)")
    table = out / f"{table_name.lower().replace(' ', '')}.md"
    table.write_text(text)
    print(text)
    print(f"wrote {table} and {figure}")
