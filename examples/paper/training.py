"""The training methods compared, and the pieces of a training run they share.

A `Method` is a baseline (a sampler, or a loss that replaces cross-entropy), optionally plus CRL.
`make_objective` and `make_sampler` build them from the training labels; `METHODS` names the
offline benchmark's methods: the paper's baselines and six CRL variants, the baselines a user
would pick today (`paper.losses`), CRL on top of two of them, and the CRL options. `fit` is the
CelebA and X-Domain scripts' training loop (SGD, tqdm, CSV log, a checkpoint per epoch, resume),
`evaluate` their test.
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

from crl_ops import CRL, BalancedAccuracy, class_balanced_accuracy, cross_entropy, imbalance_measure, imbalance_ratios
from crl_ops.balancing import DownSampler, OverSampler, balancing_weights, sample_weights, weighted_cross_entropy

from . import losses

SAMPLERS = ("oversample", "downsample")
LOSSES = ("costsensitive", "classbalanced", "focal", "logitadjust", "ldam-drw")  # replace cross-entropy
BASELINES = SAMPLERS + LOSSES
BASELINE_LABELS = {"oversample": "Over-Sampling", "downsample": "Down-Sampling", "costsensitive": "Cost-Sensitive",
                   "classbalanced": "Class-Balanced", "focal": "Focal", "logitadjust": "Logit-Adjusted",
                   "ldam-drw": "LDAM-DRW"}
MODES = ("class", "instance")
FORMS = ("absolute", "relative", "distribution")  # Table 4's column order: A, R, D
REDUCTIONS = ("pooled", "attribute")
DISTANCES = ("feature", "score")


@dataclass(frozen=True)
class BaselineSettings:
    """The published defaults of the baselines; no method is tuned on the benchmark's data."""

    tau: float = 1.0  # logit adjustment (Menon et al.): tau = 1, the balanced softmax
    gamma: float = 2.0  # focal loss (Lin et al.)
    beta: float = 0.9999  # effective number of samples (Cui et al.; LDAM-DRW's re-weighting)
    max_margin: float = 0.5  # LDAM's largest margin (Cao et al.)
    scale: float = 30.0  # LDAM's cosine classifier scale s
    drw_start: float = 0.8  # DRW re-weights from this fraction of training on (epoch 160 of 200)


@dataclass(frozen=True)
class Method:
    """One training recipe: a baseline (sampler or loss, or plain CE), optionally plus CRL.

    With `crl`, the objective adds `weight * l_crl(mode, form)` to the baseline's loss, weight
    `crl_weight` or the run's default (the paper's 1). `normalize`, `reduction`, `distance`,
    `threshold` and `margin` are crl_ops.CRL's options. `eta` replaces the sum by the journal
    version's `alpha * l_crl + (1 - alpha) * l_cls` with `alpha = eta * Omega_imb`
    (crl_ops.imbalance_measure of the training labels, mean over attributes).
    """

    baseline: Optional[str] = None  # None or one of BASELINES
    crl: bool = False
    mode: str = "instance"
    form: str = "relative"
    crl_weight: Optional[float] = None
    normalize: bool = False
    reduction: str = "pooled"
    distance: str = "feature"
    threshold: float = 0.5
    margin: Optional[float] = None
    eta: Optional[float] = None

    def __post_init__(self):
        if self.baseline not in (None, *BASELINES):
            raise ValueError(f"baseline must be None or one of {BASELINES}, got {self.baseline!r}")
        if self.mode not in MODES or self.form not in FORMS:
            raise ValueError(f"mode must be one of {MODES} and form one of {FORMS}, got {self.mode!r}, {self.form!r}")
        if self.reduction not in REDUCTIONS or self.distance not in DISTANCES:
            raise ValueError(f"reduction must be one of {REDUCTIONS} and distance one of {DISTANCES}, "
                             f"got {self.reduction!r}, {self.distance!r}")
        if self.crl_options() and not self.crl:
            raise ValueError("crl_weight, eta and crl_ops.CRL's options apply to CRL: set crl=True")
        if self.eta is not None and self.crl_weight is not None:
            raise ValueError("give crl_weight (l_cls + weight * l_crl) or eta (alpha = eta * Omega_imb), not both")

    def crl_options(self) -> dict:
        """The fields that differ from the paper's CRL: crl_ops.CRL's options, crl_weight and eta."""
        return {key: value for key, value in asdict(self).items()
                if key in _CRL_OPTIONS and value != getattr(Method, key)}

    @property
    def name(self) -> str:
        """Short name: "ce", "oversample", "crl-i-r" (mode and form initials), "logitadjust+crl-i-r-norm@0.3"."""
        crl = ""
        if self.crl:
            options = self.crl_options()
            crl = f"crl-{self.mode[0]}-{self.form[0]}" + "".join(
                _CRL_OPTIONS[key][0].format(value) for key, value in options.items() if key != "crl_weight") + \
                ("@{:g}".format(options["crl_weight"]) if "crl_weight" in options else "")
        if self.baseline and crl:
            return f"{self.baseline}+{crl}"
        return self.baseline or crl or "ce"

    @property
    def label(self) -> str:
        """The paper's notation: CE, Over-Sampling, ..., CRL(I+R), with the options after it."""
        crl = ""
        if self.crl:
            crl = " ".join([f"CRL({self.mode[0].upper()}+{self.form[0].upper()})",
                            *(_CRL_OPTIONS[key][1].format(value) for key, value in self.crl_options().items())])
        base = BASELINE_LABELS.get(self.baseline, "")
        return " + ".join(part for part in (base, crl) if part) or "CE"

    @property
    def cosine_classifier(self) -> bool:
        """LDAM's margins are cosine margins: its network ends in a cosine classifier."""
        return self.baseline == "ldam-drw"


# Method field: (name suffix, label word), both formatted with the field's value.
_CRL_OPTIONS = {"normalize": ("-norm", "norm"), "reduction": ("-attr", "attr-mean"), "distance": ("-score", "score"),
                "threshold": ("-rho{:g}", "ρ={:g}"), "margin": ("-m{:g}", "m={:g}"), "eta": ("-tpami", "α={:g}·Ω"),
                "crl_weight": ("@{:g}", "×{:g}")}

METHODS = {m.name: m for m in (
    Method(), *(Method(baseline=b) for b in BASELINES),
    *(Method(crl=True, mode=mode, form=form) for mode in MODES for form in FORMS),
    Method(baseline="oversample", crl=True), Method(baseline="logitadjust", crl=True),
    Method(baseline="logitadjust", crl=True, crl_weight=0.3),
    Method(crl=True, normalize=True), Method(baseline="logitadjust", crl=True, normalize=True),
    Method(baseline="logitadjust", crl=True, normalize=True, crl_weight=0.3),
    Method(crl=True, reduction="attribute"), Method(crl=True, normalize=True, reduction="attribute"),
    Method(crl=True, mode="class", distance="score", margin=0.5), Method(crl=True, eta=1.0),
)}


class ClassificationLoss(nn.Module):
    """A baseline's replacement of cross-entropy: `forward(logits, labels)`; `progress` (0 to 1,
    the fraction of training done) is set by the training loop for schedules such as DRW."""

    def __init__(self, num_classes: Sequence[int]):
        super().__init__()
        self.num_classes = tuple(num_classes)
        self.progress = 0.0

    def forward(self, logits, labels: Tensor) -> Tensor:
        return cross_entropy(logits, labels)


class WeightedCrossEntropy(ClassificationLoss):
    """crl_ops.balancing.weighted_cross_entropy with fixed class weights [A, Cmax]."""

    def __init__(self, num_classes: Sequence[int], class_weights: Tensor):
        super().__init__(num_classes)
        self.register_buffer("class_weights", class_weights.float())

    def forward(self, logits, labels: Tensor) -> Tensor:
        return weighted_cross_entropy(logits, labels, self.class_weights)


class LogitAdjustedCrossEntropy(ClassificationLoss):
    def __init__(self, num_classes: Sequence[int], log_prior: Tensor, tau: float):
        super().__init__(num_classes)
        self.register_buffer("log_prior", log_prior.float())
        self.tau = tau

    def forward(self, logits, labels: Tensor) -> Tensor:
        return losses.logit_adjusted_cross_entropy(logits, labels, self.num_classes, self.log_prior, self.tau)


class FocalLoss(ClassificationLoss):
    def __init__(self, num_classes: Sequence[int], gamma: float):
        super().__init__(num_classes)
        self.gamma = gamma

    def forward(self, logits, labels: Tensor) -> Tensor:
        return losses.focal_loss(logits, labels, self.num_classes, self.gamma)


class LDAMDeferredReweighting(ClassificationLoss):
    """LDAM on margin-lowered logits: plain until `drw_start`, then with effective-number weights."""

    def __init__(self, num_classes: Sequence[int], margins: Tensor, class_weights: Tensor, drw_start: float):
        super().__init__(num_classes)
        self.register_buffer("margins", margins.float())
        self.register_buffer("class_weights", class_weights.float())
        self.drw_start = drw_start

    def forward(self, logits, labels: Tensor) -> Tensor:
        adjusted = losses.margin_adjusted_logits(logits, labels, self.num_classes, self.margins)
        if self.progress < self.drw_start:
            return cross_entropy(adjusted, labels)
        return weighted_cross_entropy(adjusted, labels, self.class_weights)


def make_classification_loss(baseline: Optional[str], train_labels: Tensor, num_classes: Sequence[int],
                             settings: BaselineSettings = BaselineSettings()) -> ClassificationLoss:
    """The loss that `baseline` trains with in place of (or as) cross-entropy; class statistics from `train_labels`."""
    counts = losses.training_counts(train_labels, num_classes)
    if baseline == "costsensitive":
        return WeightedCrossEntropy(num_classes, balancing_weights(train_labels, num_classes))
    if baseline == "classbalanced":
        return WeightedCrossEntropy(num_classes, losses.effective_number_weights(counts, settings.beta))
    if baseline == "focal":
        return FocalLoss(num_classes, settings.gamma)
    if baseline == "logitadjust":
        return LogitAdjustedCrossEntropy(num_classes, losses.log_priors(counts), settings.tau)
    if baseline == "ldam-drw":
        margins = settings.scale * losses.ldam_margins(counts, settings.max_margin)  # in logits: s * Delta
        return LDAMDeferredReweighting(num_classes, margins, losses.effective_number_weights(counts, settings.beta),
                                       settings.drw_start)
    return ClassificationLoss(num_classes)  # cross-entropy, also under the samplers


class Objective(nn.Module):
    """`forward(features, logits, labels)`: the method's loss.

    `l_cls + weight * l_crl`, or `alpha * l_crl + (1 - alpha) * l_cls` when `alpha` is given.
    `last` holds the detached parts of the last batch (`cls`, `crl`: the terms as added),
    `parts` the same terms with their graphs (for gradient diagnostics).
    """

    def __init__(self, classification: ClassificationLoss, crl: Optional[CRL], crl_weight: float,
                 alpha: Optional[float] = None):
        super().__init__()
        self.classification = classification
        self.crl = crl
        self.crl_weight = float(crl_weight)
        self.alpha = alpha
        self.last, self.parts = {}, {}

    def set_progress(self, fraction: float) -> None:
        self.classification.progress = float(fraction)

    def forward(self, features: Tensor, logits, labels: Tensor) -> Tensor:
        cls = self.classification(logits, labels)
        if self.crl is None:
            self.parts = {"cls": cls}
        else:
            crl = self.crl(features, logits, labels)
            if self.alpha is None:
                self.parts = {"cls": cls, "crl": self.crl_weight * crl}
            else:
                self.parts = {"cls": (1 - self.alpha) * cls, "crl": self.alpha * crl}
        self.last = {key: value.detach() for key, value in self.parts.items()}
        return sum(self.parts.values())


def make_objective(method: Method, train_labels: Tensor, num_classes: Sequence[int], crl_weight: float = 1.0,
                   backend: str = "auto", settings: BaselineSettings = BaselineSettings(), **crl_kwargs) -> Objective:
    """The loss of `method`; class statistics (weights, priors, margins, Omega_imb) come from `train_labels`.

    `crl_kwargs` go to crl_ops.CRL (e.g. k); the method's own CRL options take precedence."""
    classification = make_classification_loss(method.baseline if method.baseline in LOSSES else None,
                                              train_labels, num_classes, settings)
    if not method.crl:
        return Objective(classification, None, crl_weight)
    options = {key: value for key, value in method.crl_options().items() if key not in ("crl_weight", "eta")}
    crl = CRL(mode=method.mode, form=method.form, backend=backend, **{**crl_kwargs, **options})
    alpha = None
    if method.eta is not None:
        alpha = method.eta * float(imbalance_measure(train_labels, num_classes).mean())
    return Objective(classification, crl, crl_weight if method.crl_weight is None else method.crl_weight, alpha)


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
    parser.add_argument("--baseline", choices=[b for b in BASELINES if not Method(baseline=b).cosine_classifier],
                        default=None, help="a sampler or a loss in place of CE (alone with --loss ce, or with CRL); "
                                           "LDAM-DRW needs a cosine classifier, which these networks do not have")
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
    continues from it. `out_dir/log.csv` gets the mean loss (and its classification and CRL parts)
    every `config.log_every` steps and at the end of each epoch.
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
    log = CsvLog(out_dir / "log.csv", ("epoch", "step", "loss", "cls", "crl", "seconds"))
    start = time.time()
    model.train()
    for epoch in range(first_epoch, config.epochs):
        objective.set_progress(epoch / config.epochs)
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
