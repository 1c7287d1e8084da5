"""Does CRL help, and when? CRL against the imbalance methods a user would pick instead, offline.

    python examples/offline_benchmark.py           # make demo: a subset at a short budget (about 5 min, 2 cores)
    python examples/offline_benchmark.py --full    # the committed results: every method, trained to convergence
    python examples/offline_benchmark.py --quick   # seconds: tiny data, 6 steps (what the tests run)

Two imbalanced multi-attribute image tasks that need no download (paper.data): scikit-learn's
handwritten digits made long-tailed (imbalance 1:2 to 1:25) and procedurally drawn shapes with
X-Domain-like imbalance (1:2 to 1:4000).

Every method trains the same network (paper.models.CompactAttributeNet; LDAM-DRW with its cosine
classifier) for the same number of SGD steps with the same hyper-parameters; only the loss and the
sampler differ (paper.training.METHODS): CE; the paper's baselines (over-sampling, down-sampling,
cost-sensitive CE); the ones a user would pick today (logit adjustment = balanced softmax, focal
loss, class-balanced effective-number weights, LDAM-DRW); CE + CRL in the paper's six variants;
CRL on top of over-sampling and of logit adjustment; and CRL's options. A seed fixes the initial
weights and the data order, so gains over CE are paired by seed. The metric is the class-balanced
accuracy (mean per-class recall) on a test set.

--full first trains CE at 1, 2, 4, 8 and 16 times a base number of steps (logit adjustment and
CRL(I+R) up to 8 times) and takes as the budget of every method the smallest one after which
doubling the steps improves CE by less than --converged points; then it trains every method at
that budget. Each run
also records diagnostics: CRL's anchors and triplets per attribute and batch (last_stats), how
often the rarest class of each attribute is an active minority class, the ratio of the gradient
norms of the CRL and classification terms at the features, the features' norms, and the recall of
each attribute's rarest class on the training and test sets.

Writes to --out: benchmark.json (every run, the configuration, the machine), summary.md (all
tables), <dataset>_gains.png (Figures 5/6 layout), <dataset>_diagnostics.png and, with --full,
convergence.png. Runs are deterministic: the same command on the same machine gives the same
numbers (one thread per run, fixed seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict
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
from paper.training import (FORMS, METHODS, MODES, BaselineSettings, make_objective, make_sampler,  # noqa: E402
                            predictions)

DATASETS = ("digits", "shapes")
BASELINE = "ce"
# The paper's Table 4: gain (points) of each CRL variant over DeepID2 (CelebA) and MTCT (X-Domain).
PAPER_TABLE4 = {
    "CelebA (paper)": {("class", "absolute"): 5.71, ("class", "relative"): 4.23, ("class", "distribution"): 0.54,
                       ("instance", "absolute"): 5.67, ("instance", "relative"): 5.85,
                       ("instance", "distribution"): 2.12},
    "X-Domain (paper)": {("class", "absolute"): 3.46, ("class", "relative"): 4.71, ("class", "distribution"): 1.20,
                         ("instance", "absolute"): 4.92, ("instance", "relative"): 6.13,
                         ("instance", "distribution"): 2.05},
}
PAPER_VARIANTS = [f"crl-{mode[0]}-{form[0]}" for mode in MODES for form in FORMS]  # Table 4's six
# make demo (5 minutes on 2 idle cores): CE, the classical and the strongest modern baseline, the paper's
# default CRL and the two options that change its answer; --full runs every method.
DEMO_METHODS = ["ce", "oversample", "logitadjust", "crl-i-r", "crl-i-r-norm", "logitadjust+crl-i-r@0.3"]
# Figures 5/6: the strongest baselines and the CRL variants the question is about.
PLOTTED = ["oversample", "downsample", "logitadjust", "ldam-drw", "crl-i-r", "crl-i-r-norm", "logitadjust+crl-i-r@0.3",
           "logitadjust+crl-i-r-norm@0.3"]
DIAGNOSED = ["ce", "logitadjust", "crl-i-r", "crl-i-r-norm", "logitadjust+crl-i-r"]
SWEEP_METHODS = ["ce", "logitadjust", "crl-i-r"]  # CE at every factor; the others without the last one
SWEEP_FACTORS = (1, 2, 4, 8, 16)  # times BASE_STEPS
BASE_STEPS = {"digits": 500, "shapes": 1000}
DIAGNOSE_EVERY = 10  # steps between diagnostic records
STEP_MILLISECONDS = {"digits": 4.5, "shapes": 12.0}  # one idle core; orders the runs longest first


def build_dataset(name: str, quick: bool):
    if name == "digits":
        return digits_attributes(test_per_digit=40 if quick else 80)
    return shapes_attributes(num_train=1_500 if quick else 16_000, num_test=300 if quick else 3_000)


def per_class_recall(preds: torch.Tensor, labels: torch.Tensor, num_classes) -> torch.Tensor:
    """float64 [A, Cmax]: recall of each class among the annotated labels (NaN where a class is absent)."""
    recall = torch.full((labels.shape[1], max(num_classes)), math.nan, dtype=torch.float64)
    for j, c in enumerate(num_classes):
        for k in range(c):
            members = labels[:, j] == k
            if members.any():
                recall[j, k] = (preds[members, j] == k).double().mean()
    return recall


class Diagnostics:
    """What CRL sees and does during one run, recorded every DIAGNOSE_EVERY steps."""

    def __init__(self, rarest: torch.Tensor):
        self.rarest = rarest  # [A] each attribute's rarest training class
        self.records = []

    def record(self, objective, features: torch.Tensor) -> None:
        entry = {"feature_norm": features.detach().norm(dim=-1).mean(0)}
        if "crl" in objective.parts:
            grads = {name: torch.autograd.grad(part, features, retain_graph=True, allow_unused=True)[0]
                     for name, part in objective.parts.items()}
            norms = {name: 0.0 if g is None else float(g.norm()) for name, g in grads.items()}
            entry["grad_ratio"] = norms["crl"] / norms["cls"] if norms["cls"] > 0 else math.nan
            stats = objective.crl.last_stats
            entry["anchors"] = stats.num_anchors.double()
            entry["triplets"] = stats.num_triplets.double()
            entry["active"] = stats.active.sum(1).double()
            entry["rarest_active"] = stats.active.gather(1, self.rarest[:, None]).squeeze(1).double()
        self.records.append(entry)

    def summary(self) -> dict:
        """Means over the run's records; per attribute where the record is per attribute."""
        out = {}
        for key in self.records[0]:
            values = [r[key] for r in self.records]
            if isinstance(values[0], torch.Tensor):
                out[key] = torch.stack(values).mean(0).tolist()
            else:
                finite = [v for v in values if math.isfinite(v)]
                out[key] = sum(finite) / len(finite) if finite else None
        out["train_feature_norm_trajectory"] = [float(r["feature_norm"].mean()) for r in self.records]
        return out


def train_and_test(dataset, method_name: str, seed: int, steps: int, config: dict) -> dict:
    """One run: per-attribute class-balanced test accuracy, diagnostics, and the step where the
    network's outputs stopped being finite (None if they never did; the run then stops there)."""
    method = METHODS[method_name]
    settings = BaselineSettings(**config["baseline_settings"])
    torch.manual_seed(seed)  # same initial weights for every method of this seed
    model = CompactAttributeNet(dataset.input_size, dataset.num_classes,
                                cosine_scale=settings.scale if method.cosine_classifier else None)
    generator = torch.Generator().manual_seed(seed)
    objective = make_objective(method, dataset.train_labels, dataset.num_classes, crl_weight=config["crl_weight"],
                               backend=config["backend"], settings=settings)
    sampler = make_sampler(method, dataset.train_labels, dataset.num_classes, generator)
    optimiser = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    counts = crl_ops.class_counts(dataset.train_labels, dataset.num_classes)
    rarest = torch.where(counts > 0, counts, counts.max() + 1).argmin(1)
    diagnostics = Diagnostics(rarest)
    done, diverged_at = 0, None
    while done < steps and diverged_at is None:
        # One pass of the sampler (plain shuffling without one), in random order.
        epoch = torch.tensor(list(sampler)) if sampler is not None else torch.arange(len(dataset.train_labels))
        epoch = epoch[torch.randperm(len(epoch), generator=generator)]
        for batch in epoch.split(config["batch_size"])[: steps - done]:
            objective.set_progress(done / steps)
            features, logits = model(dataset.train_images[batch])
            if not bool(torch.isfinite(features).all()):  # the weights have blown up
                diverged_at = done
                break
            loss = objective(features, logits, dataset.train_labels[batch])
            if done % DIAGNOSE_EVERY == 0:
                diagnostics.record(objective, features)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            done += 1
    model.eval()
    test_preds, _ = _evaluate(model, dataset.test_images)
    train_preds, train_norms = _evaluate(model, dataset.train_images)
    accuracy = crl_ops.class_balanced_accuracy(test_preds, dataset.test_labels, dataset.num_classes).per_attribute
    train_accuracy = crl_ops.class_balanced_accuracy(train_preds, dataset.train_labels, dataset.num_classes)
    pick = rarest[:, None]
    summary = diagnostics.summary()
    summary.update({
        "final_feature_norm": train_norms.tolist(),
        "train_accuracy": train_accuracy.per_attribute.tolist(),
        "train_recall_rarest": per_class_recall(train_preds, dataset.train_labels, dataset.num_classes)
        .gather(1, pick).squeeze(1).tolist(),
        "test_recall_rarest": per_class_recall(test_preds, dataset.test_labels, dataset.num_classes)
        .gather(1, pick).squeeze(1).tolist(),
    })
    return {"per_attribute": accuracy.tolist(), "diverged_at": diverged_at, "diagnostics": summary}


@torch.no_grad()
def _evaluate(model, images: torch.Tensor, chunk: int = 4096):
    """(predictions [N, A], mean feature norm per attribute [A]) of a model in eval mode."""
    preds, norm_sum = [], 0.0
    for part in images.split(chunk):
        features, logits = model(part)
        preds.append(predictions(logits))
        norm_sum = norm_sum + features.norm(dim=-1).sum(0)
    return torch.cat(preds), norm_sum / len(images)


_DATASETS = {}


def _worker_init(datasets):
    torch.set_num_threads(1)  # one run per core: small models parallelise better across runs
    _DATASETS.update(datasets)


def _run(task):
    dataset_name, method_name, seed, steps, config = task
    return task[:4], train_and_test(_DATASETS[dataset_name], method_name, seed, steps, config)


class RunCache:
    """Finished runs kept as JSON files, one per (dataset, method, seed, steps), so that an
    interrupted or extended run does not train them again. A file is used only if it was written
    with the same settings, method definition and library versions (its `key`)."""

    def __init__(self, folder, config: dict, quick: bool):
        self.folder = Path(folder) if folder else None
        self.hits = 0  # runs read instead of trained: their time is not in this invocation's
        self.context = {"config": {k: v for k, v in config.items() if k != "mode"}, "quick": quick,
                        "crl_ops": crl_ops.__version__, "torch": torch.__version__,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    def _path_and_key(self, task):
        dataset, method, seed, steps = task
        key = {**self.context, "method": asdict(METHODS[method]), "task": list(task)}
        return self.folder / dataset / method / f"seed{seed}-steps{steps}.json", key

    def get(self, task):
        if self.folder is None:
            return None
        path, key = self._path_and_key(task)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        if stored["key"] != json.loads(json.dumps(key)):
            return None
        self.hits += 1
        return stored["result"]

    def put(self, task, result) -> None:
        if self.folder is not None:
            path, key = self._path_and_key(task)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "result": result}))


def run_tasks(datasets: dict, tasks, config: dict, workers: int, desc: str, cache: RunCache) -> dict:
    """{(dataset, method, seed, steps): result} for every task, longest first (results do not depend
    on which worker runs what); cached runs are read, not trained."""
    results = {}
    for task in set(tasks):
        cached = cache.get(task)
        if cached is not None:
            results[task] = cached
    order = sorted(set(tasks) - set(results), key=lambda t: (-t[3] * STEP_MILLISECONDS[t[0]], t))
    bar = tqdm(total=len(order), desc=f"{desc} ({len(results)} cached)", unit="run")
    jobs = [(*t, config) for t in order]

    def finish(key, result):
        results[key] = result
        cache.put(key, result)
        bar.update()

    if workers > 1 and jobs:
        with multiprocessing.get_context("fork").Pool(workers, _worker_init, (datasets,)) as pool:
            for key, result in pool.imap_unordered(_run, jobs):
                finish(key, result)
    else:
        _worker_init(datasets)
        for job in jobs:
            finish(*_run(job))
    bar.close()
    return results


def mean_accuracy(result: dict) -> float:
    return sum(result["per_attribute"]) / len(result["per_attribute"])


def choose_budget(sweep: dict, name: str, seeds, budgets, threshold: float) -> tuple:
    """(steps, means): of the swept `budgets` (doubling), the smallest after which doubling the
    steps improves CE's mean accuracy by less than `threshold` (a fraction); the largest if none does."""
    means = [sum(mean_accuracy(sweep[(name, BASELINE, s, b)]) for s in seeds) / len(seeds) for b in budgets]
    for (steps, mean), following in zip(zip(budgets, means), means[1:]):
        if following - mean < threshold:
            return steps, means
    return budgets[-1], means


def summarise(datasets: dict, runs: dict, methods, seeds: dict) -> dict:
    """Per dataset and method: accuracy, paired gains over CE and over the strongest baseline
    (mean ± std over seeds, wins), per attribute too, and the mean diagnostics."""
    summary = {}
    for name, dataset in datasets.items():
        per_seed = {m: [runs[name][m][s]["per_attribute"] for s in range(len(seeds[name]))] for m in methods}
        gains = reporting.paired_gains(per_seed, BASELINE)
        entries = {}
        for method in methods:
            means = [sum(v) / len(v) for v in per_seed[method]]
            entry = {"label": METHODS[method].label, "mean": reporting.mean_std(means),
                     "per_attribute": [reporting.mean_std([v[j] for v in per_seed[method]])
                                       for j in range(len(dataset.attributes))],
                     "diverged_runs": sum(runs[name][method][s]["diverged_at"] is not None
                                          for s in range(len(seeds[name]))),
                     "diagnostics": _mean_diagnostics([runs[name][method][s]["diagnostics"]
                                                       for s in range(len(seeds[name]))])}
            if method in gains:
                seed_gains = [sum(v) / len(v) for v in gains[method]]
                entry["gain"] = reporting.mean_std(seed_gains)
                entry["wins"] = sum(g > 0 for g in seed_gains)
                entry["gain_per_attribute"] = [reporting.mean_std([v[j] for v in gains[method]])
                                               for j in range(len(dataset.attributes))]
            entries[method] = entry
        baselines = [m for m in methods if m != BASELINE and not METHODS[m].crl]
        strongest = max(baselines, key=lambda m: entries[m]["gain"][0]) if baselines else None
        if strongest is not None:
            for method in methods:
                if method != strongest:
                    diffs = [a - b for a, b in zip((sum(v) / len(v) for v in per_seed[method]),
                                                   (sum(v) / len(v) for v in per_seed[strongest]))]
                    entries[method]["vs_strongest"] = reporting.mean_std(diffs)
                    entries[method]["wins_vs_strongest"] = sum(d > 0 for d in diffs)
        summary[name] = {"methods": entries, "strongest_baseline": strongest}
    return summary


def _mean_diagnostics(records) -> dict:
    out = {}
    for key, value in records[0].items():
        if key == "train_feature_norm_trajectory" or value is None:
            continue
        values = [r[key] for r in records if r.get(key) is not None]
        if isinstance(value, list):
            out[key] = [sum(v[j] for v in values) / len(values) for j in range(len(value))]
        else:
            out[key] = sum(values) / len(values)
    return out


def write_outputs(out: Path, datasets: dict, ratios: dict, record: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(record, indent=1))
    summary, seeds, config = record["summary"], record["seeds"], record["config"]
    lines = ["# Offline benchmark: class-balanced accuracy (%), gains over CE", "",
             f"Mode: {config['mode']}. Seeds: " + ", ".join(f"{len(seeds[n])} on {n}" for n in datasets)
             + "; mean ± std over seeds; gains are paired by seed (wins: seeds with a positive gain). "
             + "SGD steps per run: " + ", ".join(f"{config['steps'][n]} on {n}" for n in datasets)
             + f". Wall time {record['wall_seconds'] / 60:.1f} min on {record['machine']['cpus']} CPU cores "
             + f"({record['cpu_seconds'] / 60:.1f} CPU-minutes; load average {record['load_average'][0]:.1f} "
             + f"at the start, {record['load_average'][1]:.1f} at the end)"
             + (f"; {record['runs_from_cache']} runs were read from --cache, trained by earlier invocations whose "
                "time is not counted here" if record.get("runs_from_cache") else "") + ".", ""]
    if "convergence" in record:
        lines += _convergence_lines(record["convergence"], datasets)
        reporting.plot_convergence(str(out / "convergence.png"), record["convergence"],
                                   {m: METHODS[m].label for m in SWEEP_METHODS})
        lines += ["![convergence](convergence.png)", ""]
    methods = list(summary[next(iter(datasets))]["methods"])
    diverged = [f"{METHODS[m].label} on {name} ({entry['diverged_runs']})" for name in datasets
                for m, entry in summary[name]["methods"].items() if entry["diverged_runs"]]
    lines += ["## All methods (mean over attributes)", "",
              "Runs stopped early because the network's outputs stopped being finite: "
              + (", ".join(diverged) if diverged else "none") + ".", "",
              "Strongest baseline (largest mean gain among the methods without CRL): "
              + ", ".join(f"{METHODS[summary[n]['strongest_baseline']].label} on {n}" for n in datasets
                          if summary[n]["strongest_baseline"]) + ".", "",
              "| Method | " + " | ".join(f"{n} accuracy | {n} gain over CE (wins) | {n} vs strongest (wins)"
                                       for n in datasets) + " |",
              "|---|" + "---|---|---|" * len(datasets)]
    for method in methods:
        cells = []
        for name in datasets:
            entry = summary[name]["methods"][method]
            count = len(seeds[name])
            cells += [reporting.format_cell(entry["mean"], 1),
                      _with_wins(entry.get("gain"), entry.get("wins"), count),
                      _with_wins(entry.get("vs_strongest"), entry.get("wins_vs_strongest"), count)]
        lines.append(f"| {METHODS[method].label} | " + " | ".join(cells) + " |")
    variants = {name: {(METHODS[m].mode, METHODS[m].form): summary[name]["methods"][m].get("gain")
                       for m in PAPER_VARIANTS if m in summary[name]["methods"]} for name in datasets}
    paper = {name: {cell: value / 100 for cell, value in cells.items()} for name, cells in PAPER_TABLE4.items()}
    lines += ["", "## Table 4 layout: gain of each of the paper's CRL variants over CE (points)", "",
              reporting.variant_table(variants), "The paper's Table 4, for comparison (gain over DeepID2 / MTCT):", "",
              reporting.variant_table(paper)]
    for name, dataset in datasets.items():
        entries = summary[name]["methods"]
        gained = [e for e in entries.values() if "gain" in e]
        lines += ["", f"## {name}: {dataset.description}", "", "Class-balanced accuracy per attribute:", "",
                  reporting.attribute_table(dataset.attributes, ratios[name],
                                            {e["label"]: e["per_attribute"] for e in entries.values()},
                                            {e["label"]: e["mean"] for e in entries.values()}),
                  "Gain over CE per attribute (points):", "",
                  reporting.attribute_table(dataset.attributes, ratios[name],
                                            {e["label"]: e["gain_per_attribute"] for e in gained},
                                            {e["label"]: e["gain"] for e in gained}, signed=True),
                  f"![{name} gains]({name}_gains.png)", ""]
        shown = [m for m in PLOTTED if m in entries]
        reporting.plot_gains(str(out / f"{name}_gains.png"), dataset.attributes, ratios[name],
                             {entries[m]["label"]: [g[0] for g in entries[m]["gain_per_attribute"]] for m in shown},
                             title=f"{name}: gain over CE per attribute ({len(seeds[name])} seeds)",
                             errors={entries[m]["label"]: [g[1] for g in entries[m]["gain_per_attribute"]]
                                     for m in shown}, baseline="CE")
        lines += _diagnostic_lines(name, dataset, ratios[name], entries)
        diagnosed = [m for m in DIAGNOSED if m in entries]
        reporting.plot_diagnostics(str(out / f"{name}_diagnostics.png"), dataset.attributes, ratios[name],
                                   {entries[m]["label"]: entries[m]["diagnostics"] for m in diagnosed},
                                   title=f"{name}: what the methods do to the features ({len(seeds[name])} seeds)")
        lines += [f"![{name} diagnostics]({name}_diagnostics.png)", ""]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _with_wins(cell, wins, count) -> str:
    if cell is None:
        return ""
    return f"{reporting.format_cell(cell, 2, signed=True)} ({wins}/{count})"


def _convergence_lines(convergence: dict, datasets) -> list:
    lines = ["## Training budget: mean accuracy against SGD steps", "",
             f"The budget of every method is the smallest number of steps after which doubling it improves "
             f"CE by less than {100 * convergence['threshold']:.1f} points (mean over the seeds).", ""]
    for name in datasets:
        table = convergence[name]
        lines += [f"{name}: budget {table['budget']} steps.", "",
                  "| Method | " + " | ".join(f"{b} steps" for b in table["budgets"]) + " |",
                  "|---|" + "---|" * len(table["budgets"])]
        for method, cells in table["accuracy"].items():
            lines.append(f"| {METHODS[method].label} | " + " | ".join(
                reporting.format_cell(tuple(c), 2) if c else "" for c in cells) + " |")
        lines.append("")
    return lines


def _diagnostic_lines(name: str, dataset, ratios, entries: dict) -> list:
    order = reporting.imbalance_order(ratios)
    header = "| Method | " + " | ".join(f"{dataset.attributes[j]} (1:{ratios[j]:.0f})" for j in order) + " |"
    rule = "|---|" + "---|" * len(order)

    def table(title, key, scale=1.0, digits=1, methods=None):
        rows = [title, "", header, rule]
        for method, entry in entries.items():
            values = entry["diagnostics"].get(key)
            if values is None or (methods is not None and method not in methods):
                continue
            rows.append(f"| {entry['label']} | " + " | ".join(f"{scale * values[j]:.{digits}f}" for j in order) + " |")
        return rows + [""]

    crl_methods = [m for m in entries if METHODS[m].crl]
    lines = [f"### {name}: diagnostics (mean over seeds; attributes by increasing imbalance)", ""]
    lines += table("Recall (%) of each attribute's rarest class on the training set at the end:",
                   "train_recall_rarest", 100, 0)
    lines += table("Recall (%) of each attribute's rarest class on the test set:", "test_recall_rarest", 100, 0)
    lines += table("Mean feature norm ||x_ij|| on the training set at the end:", "final_feature_norm", 1, 2)
    lines += table("CRL anchors per batch (last_stats, every 10th step):", "anchors", 1, 1, crl_methods)
    lines += table("CRL triplets per batch:", "triplets", 1, 0, crl_methods)
    lines += table("Active minority classes per batch:", "active", 1, 2, crl_methods)
    lines += table("Share (%) of batches in which the attribute's rarest class is an active minority class:",
                   "rarest_active", 100, 0, crl_methods)
    shares = ["Share (%) of the pooled triplet mean that each attribute gets (its triplets over all triplets):",
              "", header, rule]
    for method in crl_methods:
        triplets = entries[method]["diagnostics"]["triplets"]
        total = sum(triplets) or 1.0
        shares.append(f"| {entries[method]['label']} | " + " | ".join(f"{100 * triplets[j] / total:.0f}"
                                                                    for j in order) + " |")
    lines += shares + ["", "Gradient norm at the features, CRL term over classification term (mean over the run):", "",
                       "| Method | ratio |", "|---|---|"]
    for method in crl_methods:
        ratio = entries[method]["diagnostics"].get("grad_ratio")
        lines.append(f"| {entries[method]['label']} | {'n/a' if ratio is None else f'{ratio:.2f}'} |")
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="every method, 5 seeds, budget from a convergence sweep (hours; the committed results)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, 6 steps (with --full: a sweep from 3 steps), 2 seeds (seconds; for tests)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per method and dataset (default 5; the demo runs 3 on shapes)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of digits,shapes")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all with --full, "
                             f"else {','.join(DEMO_METHODS)})")
    parser.add_argument("--steps-digits", type=int, default=None,
                        help=f"SGD steps per digits run (default: the sweep's budget with --full, else "
                             f"{BASE_STEPS['digits']})")
    parser.add_argument("--steps-shapes", type=int, default=None,
                        help=f"SGD steps per shapes run (default: the sweep's budget with --full, else "
                             f"{BASE_STEPS['shapes']})")
    parser.add_argument("--converged", type=float, default=1.0,
                        help="--full: CE is converged when doubling the steps gains less than this (points)")
    parser.add_argument("--lr", type=float, default=0.02, help="initial learning rate (cosine decay to 0)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--crl-weight", type=float, default=1.0, help="weight of l_crl (paper Eq. 8: 1)")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "reference"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (processes)")
    parser.add_argument("--out", default=None,
                        help="output folder (default examples/results/offline/ with --full, else its demo/)")
    parser.add_argument("--cache", default=None,
                        help="folder that keeps every finished run, so that an interrupted or extended run "
                             "trains only what is missing (default: none)")
    args = parser.parse_args(argv)

    names = [n for n in args.datasets.split(",") if n]
    methods = [m for m in (args.methods.split(",") if args.methods else
                           list(METHODS) if args.full else DEMO_METHODS) if m]
    for flag, values, allowed in (("--datasets", names, DATASETS), ("--methods", methods, tuple(METHODS))):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(f"{flag}: unknown or empty {unknown}; choose from {','.join(allowed)}")
    if BASELINE not in methods:
        methods.insert(0, BASELINE)  # gains are measured against CE
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    mode = "full" if args.full else "demo"
    mode += " (quick)" * args.quick
    seeds = {name: list(range(args.seeds or (2 if args.quick else 3 if not args.full and name == "shapes" else 5)))
             for name in names}
    base_steps = {name: 3 if args.quick else BASE_STEPS[name] for name in names}
    out = Path(args.out or EXAMPLES / "results" / "offline" / ("" if args.full else "demo"))
    config = {"mode": mode, "lr": args.lr, "batch_size": args.batch_size, "crl_weight": args.crl_weight,
              "backend": args.backend, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine to 0",
              "baseline_settings": vars(BaselineSettings()), "diagnose_every": DIAGNOSE_EVERY}

    start, cpu_start, load_start = time.time(), _cpu_seconds(), os.getloadavg()[0]
    print(f"crl-ops {crl_ops.__version__}, torch {torch.__version__}, native CPU kernels: "
          f"{crl_ops.native_available('cpu')}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}",
          flush=True)
    datasets = {name: build_dataset(name, args.quick) for name in names}
    ratios = {name: imbalance_ratios(d.train_labels, d.num_classes).tolist() for name, d in datasets.items()}
    for name, d in datasets.items():
        print(f"{name}: {d.description}; training imbalance 1:" + ", 1:".join(f"{r:.0f}" for r in ratios[name]))

    cache = RunCache(args.cache, config, args.quick)
    record = {}
    steps = {name: 6 if args.quick else getattr(args, f"steps_{name}") or BASE_STEPS[name] for name in names}
    finished = {}
    if args.full:
        sweep_tasks = [(n, m, s, base_steps[n] * f) for n in names for m in SWEEP_METHODS for s in seeds[n]
                       for f in (SWEEP_FACTORS if m == BASELINE else SWEEP_FACTORS[:-1])]
        finished = run_tasks(datasets, sweep_tasks, config, max(1, args.workers), "convergence sweep", cache)
        convergence = {"threshold": args.converged / 100}
        for name in names:
            budgets = [base_steps[name] * f for f in SWEEP_FACTORS]
            budget, _ = choose_budget(finished, name, seeds[name], budgets, args.converged / 100)
            steps[name] = getattr(args, f"steps_{name}") or budget
            convergence[name] = {"budget": steps[name], "budgets": budgets, "accuracy": {
                m: [reporting.mean_std([mean_accuracy(finished[(name, m, s, b)]) for s in seeds[name]])
                    if (name, m, seeds[name][0], b) in finished else None for b in budgets] for m in SWEEP_METHODS}}
        record["convergence"] = convergence
    config["steps"] = steps
    tasks = [(n, m, s, steps[n]) for n in names for m in methods for s in seeds[n]]
    finished.update(run_tasks(datasets, [t for t in tasks if t not in finished], config, max(1, args.workers),
                              "runs (dataset x method x seed)", cache))
    runs = {n: {m: [finished[(n, m, s, steps[n])] for s in seeds[n]] for m in methods} for n in names}
    summary = summarise(datasets, runs, methods, seeds)
    record.update({
        "config": config, "seeds": seeds, "wall_seconds": round(time.time() - start, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu_start, 1), "load_average": [load_start, os.getloadavg()[0]],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "native_kernels": crl_ops.native_available("cpu")},
        "datasets": {name: {"description": d.description, "attributes": d.attributes, "num_classes": d.num_classes,
                            "train_imbalance_ratios": ratios[name], "train_size": len(d.train_labels),
                            "test_size": len(d.test_labels)} for name, d in datasets.items()},
        "runs": runs, "summary": summary, "runs_from_cache": cache.hits,
    })
    text = write_outputs(out, datasets, ratios, record)
    print(text)
    print(f"wrote {out}/benchmark.json, summary.md and the plots in {(time.time() - start) / 60:.1f} min")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers)."""
    usage = os.times()
    return usage.user + usage.system + usage.children_user + usage.children_system


if __name__ == "__main__":
    sys.exit(main())
