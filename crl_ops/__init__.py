"""crl-ops: the Class Rectification Loss (Dong, Gong, Zhu, ICCV 2017) for imbalanced deep learning.

    loss = ce + crl_ops.CRL(mode="instance", form="relative")(features, logits, labels)
"""
from . import reference
from ._native import available as native_available
from .loss import CRL, BalancedLoss, BatchStats, Mined, cross_entropy, mine, profile_minority
from .metrics import BalancedAccuracy, class_balanced_accuracy, class_counts, imbalance_ratios

__version__ = "0.1.0"

__all__ = [
    "CRL",
    "BalancedLoss",
    "BatchStats",
    "Mined",
    "BalancedAccuracy",
    "class_balanced_accuracy",
    "class_counts",
    "imbalance_ratios",
    "cross_entropy",
    "mine",
    "native_available",
    "profile_minority",
    "reference",
]
