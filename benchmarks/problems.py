"""The benchmark's inputs: batch shapes and seeded synthetic batches with realistic label imbalance."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Union

import torch
from torch import nn

# X-Domain's class counts as the paper gives them: 6 to 55 per attribute, 178 in all.
XDOMAIN_NUM_CLASSES = (16, 55, 16, 12, 21, 14, 15, 23, 6)

BINARY = "binary"  # CelebA-like: binary attributes, minority fractions from 2% to 50%, all annotated
LONG_TAIL = "long-tail"  # X-Domain-like: Zipf class priors, some entries not annotated

UNANNOTATED_FRACTION = 0.1
ZIPF_EXPONENT = 1.5


@dataclass(frozen=True)
class Shape:
    labels: str  # BINARY or LONG_TAIL
    batch_size: int
    num_classes: tuple
    dim: int
    k: int = 5

    @property
    def num_attributes(self) -> int:
        return len(self.num_classes)

    def with_batch(self, batch_size: int) -> "Shape":
        return replace(self, batch_size=batch_size)

    def describe(self) -> str:
        classes = set(self.num_classes)
        c = str(classes.pop()) if len(classes) == 1 else f"{min(self.num_classes)}..{max(self.num_classes)}"
        return f"B={self.batch_size} A={self.num_attributes} C={c} D={self.dim} K={self.k}"

    def as_dict(self) -> dict:
        return {"labels": self.labels, "B": self.batch_size, "A": self.num_attributes,
                "num_classes": list(self.num_classes), "C": max(self.num_classes), "D": self.dim, "K": self.k}


def binary_shape(batch_size: int = 128, num_attributes: int = 40, dim: int = 64, k: int = 5) -> Shape:
    return Shape(BINARY, batch_size, (2,) * num_attributes, dim, k)


# The configurations of the native-kernels issue.
CONFIGS = {
    "celeba": binary_shape(),
    "xdomain": Shape(LONG_TAIL, 256, tuple(XDOMAIN_NUM_CLASSES), 128),
    "large": binary_shape(batch_size=4096),
}


@dataclass
class Inputs:
    features: torch.Tensor  # [B, A, D] float32, requires grad
    logits: Union[torch.Tensor, list]  # [B, A] binary logits, or A tensors [B, C_j]
    labels: torch.Tensor  # [B, A] int64, -1 = not annotated


def _binary_labels(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    # One minority fraction per attribute, log-spaced from 2% to 50% as CelebA's 40 attributes are.
    fractions = torch.logspace(math.log10(0.02), math.log10(0.5), shape.num_attributes, dtype=torch.float64)
    draws = torch.rand(shape.batch_size, shape.num_attributes, generator=generator, dtype=torch.float64)
    return (draws < fractions).long()


def _long_tail_labels(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    columns = []
    for classes in shape.num_classes:
        priors = torch.arange(1, classes + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
        order = torch.randperm(classes, generator=generator)  # the rare classes are not always the last ones
        columns.append(torch.multinomial(priors[order], shape.batch_size, replacement=True, generator=generator))
    labels = torch.stack(columns, 1)
    unannotated = torch.rand(labels.shape, generator=generator) < UNANNOTATED_FRACTION
    return labels.masked_fill(unannotated, -1)


def make_inputs(shape: Shape, device: Union[str, torch.device], seed: int = 0) -> Inputs:
    """A seeded batch of random features and logits with imbalanced labels, on `device`."""
    generator = torch.Generator().manual_seed(seed)
    if shape.labels == BINARY:
        labels = _binary_labels(shape, generator)
        logits = torch.randn(shape.batch_size, shape.num_attributes, generator=generator).to(device)
    else:
        labels = _long_tail_labels(shape, generator)
        logits = [torch.randn(shape.batch_size, c, generator=generator).to(device) for c in shape.num_classes]
    features = torch.randn(shape.batch_size, shape.num_attributes, shape.dim, generator=generator)
    return Inputs(features.to(device).requires_grad_(), logits, labels.to(device))


class DeepID2Sized(nn.Module):
    """The training-step benchmark's network: DeepID2's trunk (four convolutions on 55x47 face
    crops, a 160-d FC1) and a 64-d feature and one logit per binary attribute, as the paper's
    CelebA model. A stand-in of the same cost, so that the benchmarks need no reproduction code.
    """

    input_size = (3, 55, 47)

    def __init__(self, num_attributes: int = 40, feature_dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 20, 4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 40, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(40, 60, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(60, 80, 2), nn.ReLU(), nn.Flatten(),
            nn.Linear(80 * 4 * 3, 160), nn.ReLU(),
        )
        self.features = nn.Linear(160, num_attributes * feature_dim)
        self.classifiers = nn.Parameter(torch.randn(num_attributes, feature_dim) / feature_dim ** 0.5)

    def forward(self, images):
        features = self.features(self.trunk(images)).unflatten(1, (self.classifiers.shape[0], -1))
        return features, (features * self.classifiers).sum(-1)  # [B, A, D], binary logits [B, A]
