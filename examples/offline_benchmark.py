"""The paper's comparison (Table 4 and the baselines of Tables 2-3) on real and procedural data, offline.

    python examples/offline_benchmark.py            # default: both datasets, 10 methods, 5 / 3 seeds
    python examples/offline_benchmark.py --quick    # a few seconds: tiny data, few steps (for tests)

Two imbalanced multi-attribute tasks that need no download (paper.data):
- digits: scikit-learn's bundled handwritten digits, digit identity made long-tailed (1:20),
  plus attributes derived from it (closed loops, prime) and from the pixels (heavy ink);
- shapes: procedurally drawn images with six attributes, imbalanced from 1:2 to 1:4000 like X-Domain.

Every method trains the same network (paper.models.CompactAttributeNet) for the same number of
SGD steps with the same hyper-parameters; only the loss and the sampler differ: CE,
over-sampling, down-sampling, cost-sensitive CE, and CE + CRL in its six variants (class or
instance mining x absolute, relative or distribution loss) with the paper's weight 1. Each
(method, seed) pair starts from the same initial weights as CE with that seed, so gains are
paired by seed. The metric is the class-balanced accuracy (mean per-class recall) on the test set.

Writes to --out (default examples/results/offline/): benchmark.json (every run's per-attribute accuracy),
summary.md (Table 4 layout and per-attribute tables) and <dataset>_gains.png (Figures 5/6 layout).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

EXAMPLES = Path(__file__).resolve().parent
sys.path[:0] = [str(EXAMPLES.parent), str(EXAMPLES)]  # from a checkout: crl_ops, and the paper package

import crl_ops  # noqa: E402
from crl_ops import imbalance_ratios  # noqa: E402
from paper import reporting  # noqa: E402
from paper.data import digits_attributes, shapes_attributes  # noqa: E402
from paper.models import CompactAttributeNet  # noqa: E402
from paper.training import METHODS, make_objective, make_sampler, predict  # noqa: E402

DATASETS = ("digits", "shapes")
# The paper's Table 4: gain (points) of each CRL variant over DeepID2 (CelebA) and MTCT (X-Domain).
PAPER_TABLE4 = {
    "CelebA (paper)": {("class", "absolute"): 5.71, ("class", "relative"): 4.23, ("class", "distribution"): 0.54,
                       ("instance", "absolute"): 5.67, ("instance", "relative"): 5.85,
                       ("instance", "distribution"): 2.12},
    "X-Domain (paper)": {("class", "absolute"): 3.46, ("class", "relative"): 4.71, ("class", "distribution"): 1.20,
                         ("instance", "absolute"): 4.92, ("instance", "relative"): 6.13,
                         ("instance", "distribution"): 2.05},
}
CRL_VARIANTS = [name for name, m in METHODS.items() if m.crl]
BASELINE = "ce"


def build_dataset(name: str, quick: bool):
    if name == "digits":
        return digits_attributes(test_per_digit=40 if quick else 80)
    return shapes_attributes(num_train=1_500 if quick else 16_000, num_test=300 if quick else 3_000)


def train_and_test(dataset, method_name: str, seed: int, config: dict) -> dict:
    """One run: per-attribute class-balanced accuracy on the test set, and the step where the
    network's outputs stopped being finite (None if they never did; the run then stops and is
    tested as it is)."""
    method = METHODS[method_name]
    torch.manual_seed(seed)  # same initial weights for every method of this seed
    model = CompactAttributeNet(dataset.input_size, dataset.num_classes)
    generator = torch.Generator().manual_seed(seed)
    objective = make_objective(method, dataset.train_labels, dataset.num_classes, crl_weight=config["crl_weight"],
                               backend=config["backend"])
    sampler = make_sampler(method, dataset.train_labels, dataset.num_classes, generator)
    optimiser = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=5e-4)
    steps = config["steps"][dataset.name]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    done, diverged_at = 0, None
    while done < steps and diverged_at is None:
        # One pass of the sampler (plain shuffling without one), in random order.
        epoch = torch.tensor(list(sampler)) if sampler is not None else torch.arange(len(dataset.train_labels))
        epoch = epoch[torch.randperm(len(epoch), generator=generator)]
        for batch in epoch.split(config["batch_size"])[: steps - done]:
            features, logits = model(dataset.train_images[batch])
            if not bool(torch.isfinite(features).all()):  # the weights have blown up
                diverged_at = done
                break
            loss = objective(features, logits, dataset.train_labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            done += 1
    preds, labels = predict(model, [(dataset.test_images, dataset.test_labels)])
    accuracy = crl_ops.class_balanced_accuracy(preds, labels, dataset.num_classes).per_attribute.tolist()
    return {"per_attribute": accuracy, "diverged_at": diverged_at}


_DATASETS = {}


def _worker_init(datasets):
    torch.set_num_threads(1)  # one run per core: small models parallelise better across runs
    _DATASETS.update(datasets)


def _run(task):
    dataset_name, method_name, seed, config = task
    return task[:3], train_and_test(_DATASETS[dataset_name], method_name, seed, config)


def run_all(datasets: dict, methods, seeds: dict, config, workers: int) -> dict:
    """results[dataset][method][seed] = that run's result (train_and_test); seeds[dataset] = 0, 1, ..."""
    tasks = [(d, m, s, config) for d in datasets for s in seeds[d] for m in methods]
    results = {d: {m: [None] * len(seeds[d]) for m in methods} for d in datasets}
    bar = tqdm(total=len(tasks), desc="runs (dataset x method x seed)", unit="run")
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers, _worker_init, (datasets,)) as pool:
            for (d, m, s), accuracy in pool.imap_unordered(_run, tasks):
                results[d][m][s] = accuracy
                bar.update()
    else:
        _worker_init(datasets)
        for task in tasks:
            (d, m, s), accuracy = _run(task)
            results[d][m][s] = accuracy
            bar.update()
    bar.close()
    return results


def summarise(datasets: dict, results: dict, methods) -> dict:
    """Mean accuracy and paired gains over CE (mean ± std over seeds), overall and per attribute."""
    summary = {}
    for name, dataset in datasets.items():
        runs = {method: [run["per_attribute"] for run in results[name][method]] for method in methods}
        gains = reporting.paired_gains(runs, BASELINE)
        per_method = {}
        for method in methods:
            means = [sum(seed) / len(seed) for seed in runs[method]]
            per_attribute = [reporting.mean_std([seed[j] for seed in runs[method]])
                             for j in range(len(dataset.attributes))]
            entry = {"label": METHODS[method].label, "mean": reporting.mean_std(means), "per_attribute": per_attribute,
                     "diverged_runs": sum(run["diverged_at"] is not None for run in results[name][method])}
            if method in gains:
                entry["gain"] = reporting.mean_std([sum(seed) / len(seed) for seed in gains[method]])
                entry["gain_per_attribute"] = [reporting.mean_std([seed[j] for seed in gains[method]])
                                               for j in range(len(dataset.attributes))]
            per_method[method] = entry
        summary[name] = per_method
    return summary


def write_outputs(out: Path, datasets: dict, ratios: dict, results: dict, summary: dict, config: dict,
                  seeds, wall_seconds: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config, "seeds": seeds, "wall_seconds": round(wall_seconds, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "native_kernels": crl_ops.native_available("cpu")},
        "datasets": {name: {"description": d.description, "attributes": d.attributes, "num_classes": d.num_classes,
                            "train_imbalance_ratios": ratios[name], "train_size": len(d.train_labels),
                            "test_size": len(d.test_labels)} for name, d in datasets.items()},
        "runs": results, "summary": summary,
    }
    (out / "benchmark.json").write_text(json.dumps(record, indent=1))

    seed_counts = ", ".join(f"{len(seeds[n])} on {n}" for n in datasets)
    lines = ["# Offline benchmark: class-balanced accuracy (%), gains over CE", "",
             f"Seeds: {seed_counts}; mean ± std over seeds; gains are paired by seed. "
             f"Wall time {wall_seconds / 60:.1f} min on {os.cpu_count()} CPU cores.", ""]
    variants = {name: {(METHODS[m].mode, METHODS[m].form): summary[name][m].get("gain")
                       for m in CRL_VARIANTS if m in summary[name]} for name in datasets}
    paper = {name: {cell: value / 100 for cell, value in cells.items()} for name, cells in PAPER_TABLE4.items()}
    diverged = [f"{METHODS[m].label} on {name} ({entry['diverged_runs']})" for name in datasets
                for m, entry in summary[name].items() if entry["diverged_runs"]]
    lines += ["## Table 4 layout: gain of each CRL variant over CE (points)", "",
              reporting.variant_table(variants), "The paper's Table 4, for comparison (gain over DeepID2 / MTCT):", "",
              reporting.variant_table(paper), "## All methods (mean over attributes)", "",
              "Runs stopped early because the network's outputs stopped being finite: "
              + (", ".join(diverged) if diverged else "none") + ".", "",
              "| Method | " + " | ".join(f"{n} accuracy | {n} gain over CE" for n in datasets) + " |",
              "|---|" + "---|---|" * len(datasets)]
    for method in summary[next(iter(datasets))]:
        cells = []
        for name in datasets:
            entry = summary[name][method]
            cells += [reporting.format_cell(entry["mean"], 1), reporting.format_cell(entry.get("gain"), 2, signed=True)]
        lines.append(f"| {METHODS[method].label} | " + " | ".join(cells) + " |")
    for name, dataset in datasets.items():
        entries = summary[name]
        lines += ["", f"## {name}: {dataset.description}", "", "Class-balanced accuracy per attribute:", "",
                  reporting.attribute_table(dataset.attributes, ratios[name],
                                            {e["label"]: e["per_attribute"] for e in entries.values()},
                                            {e["label"]: e["mean"] for e in entries.values()}),
                  "Gain over CE per attribute (points):", "",
                  reporting.attribute_table(dataset.attributes, ratios[name],
                                            {e["label"]: e["gain_per_attribute"] for e in entries.values() if "gain" in e},
                                            {e["label"]: e["gain"] for e in entries.values() if "gain" in e},
                                            signed=True),
                  f"![{name} gains]({name}_gains.png)"]
        reporting.plot_gains(str(out / f"{name}_gains.png"), dataset.attributes, ratios[name],
                             {e["label"]: [g[0] for g in e["gain_per_attribute"]] for e in entries.values() if "gain" in e},
                             title=f"{name}: gain over CE per attribute ({len(seeds[name])} seeds)",
                             errors={e["label"]: [g[1] for g in e["gain_per_attribute"]]
                                     for e in entries.values() if "gain" in e}, baseline="CE")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, 6 steps, 2 seeds (seconds; for tests)")
    parser.add_argument("--seeds-digits", type=int, default=None, help="seeds per method on digits (default 5)")
    parser.add_argument("--seeds-shapes", type=int, default=None, help="seeds per method on shapes (default 3)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of digits,shapes")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--steps-digits", type=int, default=500, help="SGD steps per digits run")
    parser.add_argument("--steps-shapes", type=int, default=1000, help="SGD steps per shapes run")
    parser.add_argument("--lr", type=float, default=0.02, help="initial learning rate (cosine decay to 0)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--crl-weight", type=float, default=1.0, help="weight of l_crl (paper Eq. 8: 1)")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "reference"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (processes)")
    parser.add_argument("--out", default=str(EXAMPLES / "results" / "offline"), help="output folder")
    args = parser.parse_args(argv)

    names = [n for n in args.datasets.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    for flag, values, allowed in (("--datasets", names, DATASETS), ("--methods", methods, tuple(METHODS))):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(f"{flag}: unknown or empty {unknown}; choose from {','.join(allowed)}")
    if BASELINE not in methods:
        methods.insert(0, BASELINE)  # gains are measured against CE
    steps = {"digits": args.steps_digits, "shapes": args.steps_shapes}
    if args.quick:
        steps = {name: 6 for name in steps}
    config = {"steps": steps, "lr": args.lr, "batch_size": args.batch_size, "crl_weight": args.crl_weight,
              "backend": args.backend, "quick": args.quick, "momentum": 0.9, "weight_decay": 5e-4,
              "schedule": "cosine to 0"}
    seeds = {}
    for name, default in (("digits", 5), ("shapes", 3)):
        count = getattr(args, f"seeds_{name}") or (2 if args.quick else default)
        if count < 1:
            parser.error(f"--seeds-{name} must be >= 1")
        seeds[name] = list(range(count))

    start = time.time()
    print(f"crl-ops {crl_ops.__version__}, torch {torch.__version__}, native CPU kernels: "
          f"{crl_ops.native_available('cpu')}", flush=True)
    datasets = {name: build_dataset(name, args.quick) for name in names}
    ratios = {name: imbalance_ratios(d.train_labels, d.num_classes).tolist() for name, d in datasets.items()}
    for name, d in datasets.items():
        print(f"{name}: {d.description}; training imbalance 1:" + ", 1:".join(f"{r:.0f}" for r in ratios[name]))
    results = run_all(datasets, methods, seeds, config, max(1, args.workers))
    summary = summarise(datasets, results, methods)
    text = write_outputs(Path(args.out), datasets, ratios, results, summary, config, seeds, time.time() - start)
    print(text)
    print(f"wrote {args.out}/benchmark.json, summary.md and *_gains.png in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
