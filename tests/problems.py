"""Random CRL problems in every accepted input format, and their canonical view for the oracle."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

import crl_ops
from crl_ops import FORMS, MODES  # noqa: F401 (the tests import them from here)

CPU_BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(not crl_ops.native_available("cpu"),
                                                    reason="native CPU kernels not built")),
]
LOGIT_FORMATS = ("list", "tensor3d", "binary", "single")


class AttributeNet(nn.Module):
    """A shared layer, per-attribute features [B, A, dim] and one classifier per attribute."""

    def __init__(self, input_size, num_classes, dim, activation=torch.relu):
        super().__init__()
        self.activation = activation
        self.embed = nn.Linear(input_size, len(num_classes) * dim)
        self.classifiers = nn.ModuleList(nn.Linear(dim, c) for c in num_classes)

    def forward(self, x):
        features = self.activation(self.embed(x)).view(x.shape[0], len(self.classifiers), -1)
        return features, [head(features[:, j]) for j, head in enumerate(self.classifiers)]


@dataclass(frozen=True)
class Problem:
    features: torch.Tensor  # [B, A, D] float64 values
    logits: tuple  # A tensors [B, C_j] float64 values
    labels: torch.Tensor  # [B, A] int64
    shared_features: bool
    logit_format: str
    seed: int

    @property
    def num_classes(self):
        return tuple(lj.shape[1] for lj in self.logits)

    def formats_ok(self) -> bool:
        classes = set(self.num_classes)
        if self.logit_format == "tensor3d":
            return len(classes) == 1
        if self.logit_format == "binary":
            return classes == {2}
        if self.logit_format == "single":
            return len(self.logits) == 1
        return True

    def inputs(self, dtype=torch.float64, device="cpu"):
        """API-format leaves (features, logits, labels) and a function giving the oracle's canonical view."""
        num_attributes = self.labels.shape[1]
        if self.shared_features:
            features = self.features[:, 0].to(device, dtype).requires_grad_()
        else:
            features = self.features.to(device, dtype).requires_grad_()
        if self.logit_format == "list":
            logits = [lj.to(device, dtype).requires_grad_() for lj in self.logits]
        elif self.logit_format == "tensor3d":
            logits = torch.stack(self.logits, 1).to(device, dtype).requires_grad_()
        elif self.logit_format == "binary":
            # class logits [0, z] are given as z = l1 - l0
            logits = torch.stack([lj[:, 1] - lj[:, 0] for lj in self.logits], 1).to(device, dtype).requires_grad_()
        else:
            logits = self.logits[0].to(device, dtype).requires_grad_()
        labels = self.labels.to(device)
        if self.logit_format == "single":
            labels = labels[:, 0]

        def canonical():
            f = features[:, None, :].expand(-1, num_attributes, -1) if self.shared_features else features
            if self.logit_format == "list":
                lg = list(logits)
            elif self.logit_format == "tensor3d":
                lg = [logits[:, j] for j in range(num_attributes)]
            elif self.logit_format == "binary":
                lg = [torch.stack([torch.zeros_like(logits[:, j]), logits[:, j]], -1) for j in range(num_attributes)]
            else:
                lg = [logits]
            return f.double(), [x.double() for x in lg], self.labels.tolist()

        leaves = [features] + (list(logits) if isinstance(logits, list) else [logits])
        return features, logits, labels, canonical, leaves


def make_problem(seed, batch_size, num_classes, dim, shared_features, logit_format, unannotated=0.2,
                 skew=3.0, duplicates=0, tied_logits=0, integer_features=False, constant_attribute=None,
                 unannotated_attribute=None) -> Problem:
    """A seeded problem. integer_features: small integers (exact distances and ties, histogram
    nodes hit exactly); constant_attribute: one attribute whose annotated labels are all class 0;
    unannotated_attribute: one attribute with no annotated entry."""
    g = torch.Generator().manual_seed(seed)
    num_attributes = len(num_classes)
    labels = torch.empty(batch_size, num_attributes, dtype=torch.long)
    for j, classes in enumerate(num_classes):
        weights = torch.softmax(skew * torch.randn(classes, generator=g, dtype=torch.float64), 0)
        weights = 0.6 * weights + 0.4 / classes  # imbalanced, yet minorities usually have 2+ samples
        labels[:, j] = torch.multinomial(weights, batch_size, replacement=True, generator=g)
    labels[torch.rand(batch_size, num_attributes, generator=g) < unannotated] = -1
    if constant_attribute is not None:
        labels[:, constant_attribute] = torch.where(labels[:, constant_attribute] >= 0, 0, -1)
    if unannotated_attribute is not None:
        labels[:, unannotated_attribute] = -1
    features = torch.randn(batch_size, num_attributes, dim, generator=g, dtype=torch.float64)
    if integer_features:
        features = torch.round(2 * features)
    if shared_features:
        features = features[:, :1].expand(-1, num_attributes, -1).clone()
    logits = [torch.randn(batch_size, c, generator=g, dtype=torch.float64) for c in num_classes]
    if logit_format == "binary":
        logits = [lj - lj[:, :1] for lj in logits]  # class-0 logit 0, as the [B, A] format implies
    for _ in range(duplicates):  # exact copies: zero distances and ties broken by index
        src, dst = torch.randint(batch_size, (2,), generator=g).tolist()
        features[dst] = features[src]
        for lj in logits:
            lj[dst] = lj[src]
    for _ in range(tied_logits):  # argmax ties: the lowest class wins
        row = int(torch.randint(batch_size, (1,), generator=g))
        for lj in logits:
            lj[row] = 0.0
    return Problem(features, tuple(logits), labels, shared_features, logit_format, seed)


@st.composite
def problems(draw, max_batch=28, max_attributes=4, max_classes=5, max_dim=5):
    logit_format = draw(st.sampled_from(LOGIT_FORMATS))
    num_attributes = 1 if logit_format == "single" else draw(st.integers(1, max_attributes))
    if logit_format == "binary":
        num_classes = (2,) * num_attributes
    elif logit_format == "tensor3d":
        num_classes = (draw(st.integers(2, max_classes)),) * num_attributes
    else:
        num_classes = tuple(draw(st.lists(st.integers(2, max_classes), min_size=num_attributes,
                                          max_size=num_attributes)))
    tiny = draw(st.integers(0, 4)) == 0  # a fifth of the batches are tiny edge cases
    batch_size = draw(st.integers(1, 4) if tiny else st.integers(10, max_batch))
    attribute = st.one_of(st.none(), st.integers(0, num_attributes - 1))
    return make_problem(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch_size=batch_size,
        num_classes=num_classes,
        dim=draw(st.integers(1, max_dim)),
        shared_features=draw(st.booleans()),
        logit_format=logit_format,
        unannotated=draw(st.sampled_from([0.0, 0.1, 0.4])),
        skew=draw(st.sampled_from([0.0, 1.0, 2.0, 3.0])),
        duplicates=draw(st.integers(0, 3)),
        tied_logits=draw(st.integers(0, 2)),
        integer_features=draw(st.booleans()),
        constant_attribute=draw(attribute),
        unannotated_attribute=draw(attribute),
    )


def mined_sets(mined, k):
    """{(i, j): (positives set, negatives set)} from a crl_ops.Mined, for anchors only."""
    result = {}
    anchors = mined.anchors.cpu()
    positives, negatives = mined.positives.cpu(), mined.negatives.cpu()
    for i, j in anchors.nonzero().tolist():
        pos = {p for p in positives[i, j].tolist() if p >= 0}
        neg = {n for n in negatives[i, j].tolist() if n >= 0}
        result[(i, j)] = (pos, neg)
    return result
