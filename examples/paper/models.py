"""The paper's networks: a shared trunk, then one small sub-network per attribute.

Both return what `crl_ops.CRL` takes: `features [B, A, D]` (the per-attribute layer the CRL
acts on) and the logits.

- `CelebANet` (paper section 3.1): the DeepID2 five-layer CNN (four convolutions and the shared
  FC1 fed by the third and fourth), then one 64-d FC2 per attribute and one logit per binary
  attribute.
- `XDomainNet` (paper section 3.2): the MTCT network, five stacked NIN units, then one branch
  of three fully connected layers per attribute; the second layer of a branch is its feature.

- `CompactAttributeNet`: the same layout (small conv trunk, shared FC1, per-attribute FC2 and
  classifier) scaled down for small images, used by the offline benchmark on CPUs.

The per-attribute layers (`AttributeHeads`, built of `PerAttributeLinear`) run as one batched
matrix product for all attributes instead of A separate `nn.Linear` modules.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# X-Domain's nine attributes in the order of the paper's Table 3.
XDOMAIN_ATTRIBUTES = ("category", "colour", "collar", "button", "pattern", "shape", "length",
                      "sleeve_shape", "sleeve_length")
# The paper gives only the range (6 values for sleeve length, 55 for colour) and the total (178);
# the other counts here are stand-ins with that range and total. Training scripts take the real
# counts from the dataset manifest (paper.data.read_xdomain).
XDOMAIN_NUM_CLASSES = (16, 55, 16, 12, 21, 14, 15, 23, 6)


class PerAttributeLinear(nn.Module):
    """A separate linear map per attribute, computed as one batched product.

    Input `[B, in_features]` (shared by all attributes) or `[B, A, in_features]`; output
    `[B, A, out_features]`. Initialised like `nn.Linear`, attribute by attribute.
    """

    def __init__(self, num_attributes: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        for name, value in (("num_attributes", num_attributes), ("in_features", in_features),
                            ("out_features", out_features)):
            _check_positive_int(name, value)
        self.weight = nn.Parameter(torch.empty(num_attributes, in_features, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.empty(num_attributes, out_features)) if bias else None
        if bias:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        a, i, o = self.weight.shape
        return f"num_attributes={a}, in_features={i}, out_features={o}"

    def forward(self, x: Tensor) -> Tensor:
        out = torch.einsum("bi,aio->bao" if x.dim() == 2 else "bai,aio->bao", x, self.weight)
        return out if self.bias is None else out + self.bias


class AttributeHeads(nn.Module):
    """One small fully connected sub-network per attribute on a shared input vector.

    Each head is: the `hidden_dims` layers (with ReLU), the feature layer (`feature_dim`, the CRL
    feature) and an output layer of `num_outputs[j]` units. `forward(shared [B, in_features])`
    returns `features [B, A, feature_dim]` and the outputs padded to `[B, A, max num_outputs]`
    (the columns past `num_outputs[j]` are unused).

    The feature layer has no ReLU, so the CRL shapes exactly what the classifier reads. With a
    ReLU there, the triplet loss can push all of an attribute's features to zero, where neither
    the CRL (a zero distance has a zero gradient) nor the classifier learns any more; this
    happened on the offline benchmark's shapes data (see docs/reproduction.md).

    `cosine_scale=s` makes the output layer a cosine classifier (LDAM's normalised linear layer):
    `s * cos(feature, w_c)`, no bias. Its weights are drawn as the linear layer's, so that the
    other layers start from the same values as without it.
    """

    def __init__(self, in_features: int, num_outputs: Sequence[int], feature_dim: int,
                 hidden_dims: Sequence[int] = (), cosine_scale: Optional[float] = None):
        super().__init__()
        if isinstance(num_outputs, (str, bytes)) or not isinstance(num_outputs, Sequence) or not num_outputs:
            raise TypeError(f"num_outputs must be a non-empty sequence of ints, got {num_outputs!r}")
        for j, c in enumerate(num_outputs):
            _check_positive_int(f"num_outputs[{j}]", c)
        attributes = len(num_outputs)
        widths = [in_features, *hidden_dims, feature_dim]
        self.layers = nn.ModuleList(PerAttributeLinear(attributes, a, b) for a, b in zip(widths, widths[1:]))
        if cosine_scale is not None and not (isinstance(cosine_scale, (int, float)) and cosine_scale > 0):
            raise ValueError(f"cosine_scale must be None or a positive float, got {cosine_scale!r}")
        self.cosine_scale = cosine_scale
        self.output = PerAttributeLinear(attributes, feature_dim, max(num_outputs), bias=cosine_scale is None)

    def forward(self, shared: Tensor) -> Tuple[Tensor, Tensor]:
        x = shared
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        features = self.layers[-1](x)
        if self.cosine_scale is None:
            return features, self.output(features)
        weight = nn.functional.normalize(self.output.weight, dim=1)  # unit columns w_c per attribute
        cosine = torch.einsum("bai,aio->bao", nn.functional.normalize(features, dim=-1), weight)
        return features, self.cosine_scale * cosine


def _check_num_classes(num_classes) -> tuple:
    if isinstance(num_classes, (str, bytes)) or not isinstance(num_classes, Sequence) or not num_classes:
        raise TypeError(f"num_classes must be a non-empty sequence of ints, got {num_classes!r}")
    for j, c in enumerate(num_classes):
        if _check_positive_int(f"num_classes[{j}]", c) < 2:
            raise ValueError(f"num_classes[{j}] must be >= 2, got {c}")
    return tuple(num_classes)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_images(images: Tensor, input_size: Tuple[int, int, int], min_size: Optional[int] = None) -> None:
    """A float [B, C, H, W] batch: H, W >= min_size if given, else exactly input_size's."""
    channels, height, width = input_size
    any_size = min_size is not None
    expected = f"[B, {channels}, H>={min_size}, W>={min_size}]" if any_size else f"[B, {channels}, {height}, {width}]"
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a float tensor {expected}, got {type(images).__name__}"
                        + (f" of {images.dtype}" if isinstance(images, Tensor) else ""))
    if images.dim() == 4 and images.shape[1] == channels:
        size = tuple(images.shape[2:])
        if (min(size) >= min_size) if any_size else size == (height, width):
            return
    raise ValueError(f"images must have shape {expected}, got {list(images.shape)}")


class CelebANet(nn.Module):
    """DeepID2's five-layer CNN with a 64-d FC2 per attribute and one logit per binary attribute.

    Input: aligned face crops `[B, 3, 55, 47]` (`input_size`), DeepID2's patch size. The trunk is
    DeepID2's: conv 4x4 (20) - max-pool - conv 3x3 (40) - max-pool - conv 3x3 (60) - max-pool -
    conv 2x2 (80), and FC1 (160-d) fed by both the third (pooled) and the fourth convolution.
    DeepID2 shares conv weights locally in its upper layers; plain convolutions are used here.

    `forward(images)` returns `features [B, A, feature_dim]` (the FC2 outputs) and
    `logits [B, A]`: one logit per attribute, the `[B, A]` binary format of `crl_ops.CRL`.
    """

    input_size = (3, 55, 47)

    def __init__(self, num_attributes: int = 40, feature_dim: int = 64, fc1_dim: int = 160):
        super().__init__()
        _check_positive_int("num_attributes", num_attributes)
        self.num_attributes = num_attributes
        self.conv123 = nn.Sequential(
            nn.Conv2d(3, 20, 4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(20, 40, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(40, 60, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.conv4 = nn.Sequential(nn.Conv2d(60, 80, 2), nn.ReLU(inplace=True))
        # 55x47 input: the pooled third conv map is 60x5x4, the fourth conv map 80x4x3.
        self.fc1 = nn.Sequential(nn.Linear(60 * 5 * 4 + 80 * 4 * 3, fc1_dim), nn.ReLU(inplace=True))
        self.heads = AttributeHeads(fc1_dim, (1,) * num_attributes, feature_dim)  # FC2 and the classifiers

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        _check_images(images, self.input_size)
        pooled3 = self.conv123(images)
        conv4 = self.conv4(pooled3)
        shared = self.fc1(torch.cat([pooled3.flatten(1), conv4.flatten(1)], 1))
        features, logits = self.heads(shared)
        return features, logits.squeeze(-1)


def _nin_unit(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    """Network-in-Network mlpconv: a spatial convolution followed by two 1x1 convolutions."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1), nn.ReLU(inplace=True),
    )


class XDomainNet(nn.Module):
    """MTCT's network: five stacked NIN units, then one three-layer FC branch per attribute.

    Input: `[B, 3, 224, 224]` (`input_size`), as for the ImageNet pre-training the paper starts
    from; any size from 127x127 up works, as the trunk ends in global average pooling. The NIN
    units have 96, 256, 384, 512 and 1024 channels with 3x3 stride-2 max-pooling between them.
    Each branch is FC (branch_dim) - FC (feature_dim, the CRL feature) - FC (C_j), all branches
    computed together (`AttributeHeads`).

    `forward(images)` returns `features [B, A, feature_dim]` and a list of A logits `[B, C_j]`.
    """

    input_size = (3, 224, 224)

    def __init__(self, num_classes: Sequence[int] = XDOMAIN_NUM_CLASSES, feature_dim: int = 64,
                 branch_dim: int = 512):
        super().__init__()
        self.num_classes = _check_num_classes(num_classes)
        pool = nn.MaxPool2d(3, 2)
        self.trunk = nn.Sequential(
            _nin_unit(3, 96, 11, 4, 2), pool,
            _nin_unit(96, 256, 5, 1, 2), pool,
            _nin_unit(256, 384, 3, 1, 1), pool,
            _nin_unit(384, 512, 3, 1, 1), pool,
            _nin_unit(512, 1024, 3, 1, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.branches = AttributeHeads(1024, self.num_classes, feature_dim, hidden_dims=(branch_dim,))

    def forward(self, images: Tensor) -> Tuple[Tensor, list]:
        _check_images(images, self.input_size, min_size=127)
        shared = self.trunk(images)
        features, padded = self.branches(shared)
        return features, [padded[:, j, :c] for j, c in enumerate(self.num_classes)]


class CompactAttributeNet(nn.Module):
    """CelebANet's layout for small images: two conv blocks, shared FC1, per-attribute FC2 + classifier.

    conv 3x3 (`channels[0]`) - max-pool - conv 3x3 (`channels[1]`) - max-pool, FC1 (`fc1_dim`),
    then per attribute FC2 (`feature_dim`, the CRL feature) and a classifier of C_j logits. The
    convolutions are batch-normalised, so that a few hundred SGD steps train it on a CPU.
    `input_size` is given at construction (height and width divisible by 4); `cosine_scale` makes
    the classifiers cosine classifiers (see `AttributeHeads`).
    `forward(images)` returns `features [B, A, feature_dim]` and a list of A logits `[B, C_j]`.
    """

    def __init__(self, input_size: Tuple[int, int, int], num_classes: Sequence[int], feature_dim: int = 32,
                 fc1_dim: int = 128, channels: Tuple[int, int] = (16, 32), cosine_scale: Optional[float] = None):
        super().__init__()
        input_size = tuple(input_size)
        if len(input_size) != 3 or min(input_size) < 1 or input_size[1] % 4 or input_size[2] % 4:
            raise ValueError(f"input_size must be (C, H, W) with H and W positive multiples of 4, got {input_size}")
        self.input_size = input_size
        self.num_classes = _check_num_classes(num_classes)
        in_channels, height, width = input_size
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.BatchNorm2d(channels[1]), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels[1] * (height // 4) * (width // 4), fc1_dim), nn.ReLU(inplace=True),
        )
        self.heads = AttributeHeads(fc1_dim, self.num_classes, feature_dim, cosine_scale=cosine_scale)

    def forward(self, images: Tensor) -> Tuple[Tensor, list]:
        _check_images(images, self.input_size)
        features, padded = self.heads(self.trunk(images))
        return features, [padded[:, j, :c] for j, c in enumerate(self.num_classes)]
