"""`CRL` and `BalancedLoss`: thin nn.Modules over `crl_ops.functional.class_rectification_loss`."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ._inputs import LogitsLike, MarginLike, check_bool, check_float, check_margin, normalise
from .functional import INPUTS_DOC, OPTIONS_DOC, RAISES_DOC, BatchStats, Options, _crl, _cross_entropy


# What a module does with a tensor margin, said under `margin` in its Args.
MODULE_OPTIONS_DOC = OPTIONS_DOC.replace(
    "or a float tensor [A] or [] (which may require grad).",
    "or a float tensor [A] or [] (which may require grad).\n"
    "        A module keeps a tensor margin as a buffer (an nn.Parameter one as a parameter): `.to()`,\n"
    "        `.cuda()` and `.double()` move and convert it with the module, and `state_dict` saves it.",
)


class CRL(nn.Module):
    def __init__(self, mode: str = "instance", form: str = "relative", *, k: int = 5, margin: MarginLike = None,
                 apc_margin: float = 1.0, bins: int = 100, threshold: float = 0.5, normalize: bool = False,
                 reduction: str = "pooled", distance: str = "feature", backend: str = "auto", validate: bool = True,
                 distributed: bool = False, batch_sizes: str = "gathered", track_stats: bool = True):
        super().__init__()
        self.options = Options.checked(mode, form, k, apc_margin, bins, threshold, normalize, reduction, distance,
                                       backend, validate, distributed, batch_sizes)
        margin = check_margin(margin)
        if isinstance(margin, Tensor) and not isinstance(margin, nn.Parameter):
            # a buffer: it moves and converts with the module (.to(), .cuda(), .double()) and is saved
            # in state_dict; an nn.Parameter margin is a parameter, floats stay plain attributes
            self.register_buffer("margin", margin)
        else:
            self.margin = margin
        self.track_stats = check_bool("track_stats", track_stats)
        self.last_stats: Optional[BatchStats] = None

    # 2: a tensor margin that is not an nn.Parameter is a buffer, saved in state_dict
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "margin"
        if (local_metadata.get("version") or 1) < 2 and "margin" in self._buffers and key not in state_dict:
            # a checkpoint saved before margins were: the margin given to the constructor stays
            state_dict[key] = self._buffers["margin"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        defaults = Options()
        changed = [f"{name}={value!r}" for name, value in vars(self.options).items()
                   if name in ("mode", "form") or value != getattr(defaults, name)]
        return ", ".join(changed)

    def __prepare_scriptable__(self):
        raise TypeError(f"{type(self).__name__} cannot be compiled with torch.jit.script (it accepts several input "
                        "formats); use torch.compile or torch.jit.trace")

    def forward(self, features: Tensor, logits: LogitsLike, labels: Tensor) -> Tensor:
        loss, stats = _crl(self.options, self.margin, normalise(features, logits, labels,
                                                                     empty_ok=self.options.distributed))
        if self.track_stats:
            self.last_stats = stats
        return loss


CRL.__doc__ = f"""Class Rectification Loss l_crl (Dong, Gong, Zhu, ICCV 2017): a module over
`crl_ops.functional.class_rectification_loss` (docs/semantics.md).

`forward(features, logits, labels)` returns the scalar l_crl; add it to your cross-entropy
(or use `BalancedLoss`). After each forward, `last_stats` describes what was mined (`BatchStats`).

Args:
{MODULE_OPTIONS_DOC}
    track_stats: keep the last batch's `BatchStats` in `last_stats` (tensors the loss op
        returned; under CUDA graphs they are graph outputs, which the next replay overwrites:
        read them before it, or pass False to keep nothing).

forward's arguments:
{INPUTS_DOC}

Raises:
{RAISES_DOC}
"""


class BalancedLoss(nn.Module):
    def __init__(self, mode: str = "instance", form: str = "relative", *, weight: float = 1.0,
                 alpha: Optional[float] = None, k: int = 5, margin: MarginLike = None, apc_margin: float = 1.0,
                 bins: int = 100, threshold: float = 0.5, normalize: bool = False, reduction: str = "pooled",
                 distance: str = "feature", backend: str = "auto", validate: bool = True, distributed: bool = False,
                 batch_sizes: str = "gathered",
                 track_stats: bool = True):
        super().__init__()
        self.weight = check_float("weight", weight, minimum=0.0)
        self.alpha = None if alpha is None else check_float("alpha", alpha, minimum=0.0, maximum=1.0)
        self.crl = CRL(mode, form, k=k, margin=margin, apc_margin=apc_margin, bins=bins, threshold=threshold,
                       normalize=normalize, reduction=reduction, distance=distance, backend=backend,
                       validate=validate, distributed=distributed, batch_sizes=batch_sizes,
                       track_stats=track_stats)
        self.last_ce: Optional[Tensor] = None
        self.last_crl: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}" if self.alpha is not None else f"weight={self.weight}"

    def forward(self, features: Tensor, logits: LogitsLike, labels: Tensor) -> Tensor:
        crl = self.crl
        batch = normalise(features, logits, labels, empty_ok=self.crl.options.distributed)
        # first: its ops check the values
        loss, stats = _crl(crl.options, crl.margin, batch, f"BalancedLoss weight={self.weight} alpha={self.alpha}")
        if crl.track_stats:
            crl.last_stats = stats
        if crl.options.distributed:
            from . import distributed

            ce = distributed.cross_entropy(batch)
        else:
            ce = _cross_entropy(batch)
        self.last_ce, self.last_crl = ce.detach(), loss.detach()
        if self.alpha is None:
            return ce + self.weight * loss
        return (1.0 - self.alpha) * ce + self.alpha * loss

    @property
    def last_stats(self) -> Optional[BatchStats]:
        return self.crl.last_stats


BalancedLoss.__doc__ = f"""l_ce + weight * l_crl (paper Eq. 8, semantics section 4), or with `alpha`
the journal version's (1 - alpha) * l_ce + alpha * l_crl.

`forward(features, logits, labels)` returns the scalar loss; `last_ce`, `last_crl` and
`last_stats` describe the last batch. With `distributed=True` both terms are those of the
global batch (all ranks' samples).

Args:
    mode, form: as for `CRL`.
    weight: the weight of l_crl (>= 0; the paper: 1). Ignored when alpha is given.
    alpha: None, or the journal version's alpha = eta * Omega_imb in [0, 1] (`crl_ops.imbalance_measure`
        gives Omega_imb from the training labels; eta is a hyper-parameter).
    k, margin, apc_margin, bins, threshold, normalize, reduction, distance, backend, validate,
        distributed, batch_sizes, track_stats: as for `CRL`.

Raises:
{RAISES_DOC}
"""
