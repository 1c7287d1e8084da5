"""crl-ops: the Class Rectification Loss (Dong, Gong, Zhu, ICCV 2017) for imbalanced deep learning.

    loss = ce + crl_ops.CRL(mode="instance", form="relative")(features, logits, labels)

docs/semantics.md defines what every function computes.
"""
from . import balancing, functional, reference
from ._inputs import BACKENDS, DISTANCES, FORMS, MODES, REDUCTIONS
from ._native import available as native_available
from .functional import BatchStats, Mined, class_rectification_loss, cross_entropy, mine, profile_minority
from .metrics import BalancedAccuracy, class_balanced_accuracy, class_counts, imbalance_measure, imbalance_ratios
from .modules import CRL, BalancedLoss

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "DISTANCES",
    "FORMS",
    "MODES",
    "REDUCTIONS",
    "CRL",
    "BalancedLoss",
    "BatchStats",
    "Mined",
    "BalancedAccuracy",
    "balancing",
    "class_balanced_accuracy",
    "class_counts",
    "class_rectification_loss",
    "cross_entropy",
    "functional",
    "imbalance_measure",
    "imbalance_ratios",
    "mine",
    "native_available",
    "profile_minority",
    "reference",
]
