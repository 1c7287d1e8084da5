"""The training methods compared in the paper, and the pieces of a training run they share.

A `Method` is a loss (cross-entropy, cost-sensitive cross-entropy, either one plus CRL) and a
sampler (none, over-sampling, down-sampling). `make_objective` and `make_sampler` build them from
the training labels; `METHODS` names the ten of the offline benchmark (the paper's baselines and
six CRL variants). `fit` is the CelebA and X-Domain scripts' training loop (SGD, tqdm, CSV log,
a checkpoint per epoch, resume), `evaluate` their test.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from tqdm import tqdm

from crl_ops import CRL, BalancedAccuracy, class_balanced_accuracy, cross_entropy, imbalance_ratios
from crl_ops.balancing import DownSampler, OverSampler, balancing_weights, sample_weights, weighted_cross_entropy

BASELINES = ("oversample", "downsample", "costsensitive")
MODES = ("class", "instance")
FORMS = ("absolute", "relative", "distribution")  # Table 4's column order: A, R, D


@dataclass(frozen=True)
class Method:
    """One training recipe: `crl` adds `weight * l_crl(mode, form)` to the (possibly cost-sensitive) CE."""

    baseline: Optional[str] = None  # None, "oversample", "downsample" or "costsensitive"
    crl: bool = False
    mode: str = "instance"
    form: str = "relative"

    def __post_init__(self):
        if self.baseline not in (None, *BASELINES):
            raise ValueError(f"baseline must be None or one of {BASELINES}, got {self.baseline!r}")
        if self.mode not in MODES or self.form not in FORMS:
            raise ValueError(f"mode must be one of {MODES} and form one of {FORMS}, got {self.mode!r}, {self.form!r}")

    @property
    def name(self) -> str:
        """Short name: "ce", "oversample", ..., "crl-i-r" (mode and form initials), "oversample+crl-c-a"."""
        crl = f"crl-{self.mode[0]}-{self.form[0]}" if self.crl else ""
        if self.baseline and crl:
            return f"{self.baseline}+{crl}"
        return self.baseline or crl or "ce"

    @property
    def label(self) -> str:
        """The paper's notation: CE, Over-Sampling, ..., CRL(I+R)."""
        crl = f"CRL({self.mode[0].upper()}+{self.form[0].upper()})" if self.crl else ""
        base = {None: "", "oversample": "Over-Sampling", "downsample": "Down-Sampling",
                "costsensitive": "Cost-Sensitive"}[self.baseline]
        return " + ".join(part for part in (base, crl) if part) or "CE"


METHODS = {m.name: m for m in (
    Method(), *(Method(baseline=b) for b in BASELINES),
    *(Method(crl=True, mode=mode, form=form) for mode in MODES for form in FORMS),
)}


class Objective(nn.Module):
    """`forward(features, logits, labels)`: the method's loss; `last` holds the parts of the last batch."""

    def __init__(self, class_weights: Optional[Tensor], crl: Optional[CRL], crl_weight: float):
        super().__init__()
        self.register_buffer("class_weights", class_weights)
        self.crl = crl
        self.crl_weight = float(crl_weight)
        self.last = {}

    def forward(self, features: Tensor, logits, labels: Tensor) -> Tensor:
        if self.class_weights is None:
            ce = cross_entropy(logits, labels)
        else:
            ce = weighted_cross_entropy(logits, labels, self.class_weights)
        if self.crl is None:
            self.last = {"ce": ce.detach()}
            return ce
        crl = self.crl(features, logits, labels)
        self.last = {"ce": ce.detach(), "crl": crl.detach()}
        return ce + self.crl_weight * crl


def make_objective(method: Method, train_labels: Tensor, num_classes: Sequence[int], crl_weight: float = 1.0,
                   backend: str = "auto", **crl_kwargs) -> Objective:
    """The loss of `method`; cost-sensitive weights come from the class frequencies of `train_labels`."""
    weights = balancing_weights(train_labels, num_classes).float() if method.baseline == "costsensitive" else None
    crl = CRL(mode=method.mode, form=method.form, backend=backend, **crl_kwargs) if method.crl else None
    return Objective(weights, crl, crl_weight)


def make_sampler(method: Method, train_labels: Tensor, num_classes: Sequence[int],
                 generator: Optional[torch.Generator] = None) -> Optional[Sampler]:
    """The re-sampler of `method` over the training set, or None (plain shuffling)."""
    if method.baseline == "oversample":
        return OverSampler(sample_weights(train_labels, num_classes), generator=generator)
    if method.baseline == "downsample":
        return DownSampler(sample_weights(train_labels, num_classes), generator=generator)
    return None


def predictions(logits) -> Tensor:
    """Predicted classes [B, A] from `[B, A]` binary logits (class 1 when z > 0), a list or `[B, A, C]`."""
    if isinstance(logits, (list, tuple)):
        return torch.stack([lg.argmax(1) for lg in logits], 1)
    if logits.dim() == 2:
        return (logits > 0).long()
    return logits.argmax(-1)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: Union[str, torch.device] = "cpu") -> Tuple[Tensor, Tensor]:
    """(predictions [N, A], labels [N, A]) of `model` over `(images, labels)` batches, in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for images, batch_labels in batches:
        _, logits = model(images.to(device, non_blocking=True))
        preds.append(predictions(logits).cpu())
        labels.append(batch_labels)
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


class Checkpoint:
    """`last.pt` in a run folder: model, optimiser and sampler state after each epoch, for `--resume`."""

    def __init__(self, folder: Union[str, os.PathLike]):
        self.path = Path(folder) / "last.pt"

    def save(self, epoch: int, model: nn.Module, optimiser: torch.optim.Optimizer,
             generator: torch.Generator, extra: Optional[dict] = None) -> None:
        state = {"epoch": epoch, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                 "generator": generator.get_state(), "extra": extra or {}}
        partial = self.path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(self.path)  # never leave a half-written checkpoint behind

    def load(self, model: nn.Module, optimiser: torch.optim.Optimizer, generator: torch.Generator) -> Tuple[int, dict]:
        """Restores the states; returns (epochs completed, extra). Raises FileNotFoundError if absent."""
        if not self.path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from: {self.path} is missing")
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        return state["epoch"], state["extra"]


class CsvLog:
    """Appends one row per call to a CSV file (header written once), flushing each row."""

    def __init__(self, path: Union[str, os.PathLike], fields: Sequence[str]):
        self.path = Path(path)
        self.fields = tuple(fields)
        if not self.path.exists():
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.fields)

    def write(self, **values) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([values.get(f, "") for f in self.fields])


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The scripts' method flags: --loss, --mode, --form, --baseline, --crl-weight, --backend."""
    parser.add_argument("--loss", choices=("ce", "crl"), default="crl", help="ce alone, or ce + weight * crl")
    parser.add_argument("--mode", choices=MODES, default="instance", help="CRL hard mining level")
    parser.add_argument("--form", choices=FORMS, default="relative", help="CRL loss form")
    parser.add_argument("--baseline", choices=BASELINES, default=None,
                        help="re-sampling or cost-sensitive CE (alone with --loss ce, or combined with CRL)")
    parser.add_argument("--crl-weight", type=float, default=1.0, help="weight of l_crl (paper Eq. 8: 1)")
    parser.add_argument("--backend", choices=("auto", "native", "reference"), default="auto")


def method_from_args(args: argparse.Namespace) -> Method:
    return Method(baseline=args.baseline, crl=args.loss == "crl", mode=args.mode, form=args.form)


@dataclass
class TrainingConfig:
    """SGD settings of a run; the defaults are the paper's (section 3.1)."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    crl_weight: float = 1.0
    backend: str = "auto"
    workers: int = 0
    seed: int = 0
    log_every: int = 50  # steps between CSV log rows


def fit(model: nn.Module, train_set: Dataset, train_labels: Tensor, num_classes: Sequence[int], method: Method,
        config: TrainingConfig, out_dir: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
        resume: bool = False) -> nn.Module:
    """Trains `model` on `train_set` ((image, labels) items) with `method`, writing to `out_dir`.

    `train_labels` [N, A] are the labels of `train_set` (for the class frequencies the samplers
    and cost-sensitive weights need). After every epoch `out_dir/last.pt` is saved; `resume`
    continues from it. `out_dir/log.csv` gets the mean loss (and its CE and CRL parts) every
    `config.log_every` steps and at the end of each epoch.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    objective = make_objective(method, train_labels, num_classes, config.crl_weight, config.backend).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint = Checkpoint(out_dir)
    first_epoch = checkpoint.load(model, optimiser, generator)[0] if resume else 0
    sampler = make_sampler(method, train_labels, num_classes, generator) or RandomSampler(train_set, generator=generator)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                        pin_memory=torch.device(device).type == "cuda", persistent_workers=config.workers > 0)
    log = CsvLog(out_dir / "log.csv", ("epoch", "step", "loss", "ce", "crl", "seconds"))
    start = time.time()
    model.train()
    for epoch in range(first_epoch, config.epochs):
        totals, count = {}, 0
        steps = len(loader)  # read before iterating: a DownSampler draws its next epoch on iter()
        bar = tqdm(loader, desc=f"{method.name} epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False)
        for step, (images, labels) in enumerate(bar, 1):
            features, logits = model(images.to(device, non_blocking=True))
            loss = objective(features, logits, labels.to(device, non_blocking=True))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            for key, value in {"loss": loss.detach(), **objective.last}.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
            if step % config.log_every == 0 or step == steps:
                means = {key: float(value) / count for key, value in totals.items()}  # one sync per row
                log.write(epoch=epoch + 1, step=step, seconds=round(time.time() - start, 1),
                          **{key: f"{value:.5f}" for key, value in means.items()})
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                totals, count = {}, 0
        checkpoint.save(epoch + 1, model, optimiser, generator)
    return model


def evaluate(model: nn.Module, dataset: Dataset, num_classes: Sequence[int], device: Union[str, torch.device] = "cpu",
             batch_size: int = 256, workers: int = 0) -> BalancedAccuracy:
    """Class-balanced accuracy of `model` on `dataset` ((image, labels) items)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    preds, labels = predict(model, tqdm(loader, desc="evaluating", unit="batch", leave=False), device)
    return class_balanced_accuracy(preds, labels, num_classes)


def add_run_arguments(parser: argparse.ArgumentParser, epochs: int, batch_size: int) -> None:
    """The scripts' run flags, with the paper's epochs and batch size for the dataset as defaults."""
    add_method_arguments(parser)
    parser.add_argument("--out", required=True, help="run folder: last.pt, log.csv, results.json, table.md")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (paper: {epochs})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"(paper: {batch_size})")
    parser.add_argument("--lr", type=float, default=0.001, help="SGD learning rate (paper: 0.001)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image loading processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--evaluate-only", action="store_true", help="test the model in OUT/last.pt, no training")
    parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images of each split (smoke tests)")


def run_experiment(args: argparse.Namespace, dataset: str, model: nn.Module, train_set, test_set,
                   train_labels: Tensor, attributes: Sequence[str], num_classes: Sequence[int]) -> dict:
    """Trains (unless --evaluate-only) and tests `model`; writes and returns OUT/results.json's record."""
    method = method_from_args(args)
    config = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crl_weight=args.crl_weight,
                            backend=args.backend, workers=args.workers, seed=args.seed)
    torch.manual_seed(args.seed)
    if args.evaluate_only:
        path = Checkpoint(args.out).path
        if not path.is_file():
            raise FileNotFoundError(f"--evaluate-only tests a trained model, but {path} is missing")
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        model.to(args.device)
    else:
        fit(model, train_set, train_labels, num_classes, method, config, args.out, args.device, args.resume)
    result = evaluate(model, test_set, num_classes, args.device, batch_size=2 * args.batch_size, workers=args.workers)
    record = {
        "dataset": dataset, "method": method.name, "label": method.label, **asdict(method),
        "attributes": list(attributes), "num_classes": list(num_classes),
        "train_imbalance_ratios": imbalance_ratios(train_labels, num_classes).tolist(),
        "per_attribute": result.per_attribute.tolist(), "mean": float(result.mean),
        "train_size": len(train_set), "test_size": len(test_set), "args": vars(args),
    }
    Path(args.out, "results.json").write_text(json.dumps(record, indent=1))
    return record
