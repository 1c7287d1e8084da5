"""Datasets for the paper's experiments: readers for CelebA and X-Domain, and offline stand-ins.

Real data (files the user downloads):

- `read_celeba(root)`: CelebA's `list_attr_celeba.txt` and `list_eval_partition.txt` (40 binary
  attributes, the standard split 162,770 / 19,867 / 19,962); images in `root/img_align_celeba/`.
- `read_xdomain(manifest)`: X-Domain through a manifest file, the format below; the paper's
  random 165,467 / 80,000 split is `xdomain_split` (fixed seed).
- `ImageAttributeDataset`: a torch Dataset over either, loading and resizing images on demand.

X-Domain manifest (X-Domain ships no standard label file, so crl-ops defines one): a UTF-8 text
file, tab-separated. Lines starting with `#` and empty lines are skipped. The first other line is
the header: `image`, then one column per attribute written `name:number_of_values`, e.g.

    image	category:16	colour:55	collar:16	button:12	pattern:21	shape:14	length:15	sleeve_shape:23	sleeve_length:6

Every following line is an image path (relative to the manifest's folder, or absolute) and one
integer per attribute: the value's index in `0 .. number_of_values - 1`, or `-1` when the image
is not annotated for that attribute. X-Domain has the nine attributes above (178 values).

Offline stand-ins (no download; used by examples/offline_benchmark.py):

- `digits_attributes()`: scikit-learn's bundled handwritten digits, made long-tailed, with
  attributes derived from the digit.
- `shapes_attributes()`: procedurally drawn images with six multi-valued attributes whose
  training imbalance ratios go from 1:2 to 1:4000, like X-Domain's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

PathLike = Union[str, os.PathLike]

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
CELEBA_SPLITS = ("train", "val", "test")  # list_eval_partition.txt's 0, 1, 2
CELEBA_SPLIT_SIZES = (162_770, 19_867, 19_962)
XDOMAIN_SIZE = 245_467
XDOMAIN_TEST_SIZE = 80_000


@dataclass(frozen=True)
class AttributeIndex:
    """An image list with labels: what the readers return and `ImageAttributeDataset` loads.

    `labels` is int64 [N, A] (-1 = not annotated); `lines[i]` is the 1-based line of image i in
    `listing`, so that a missing image can be reported where it was listed.
    """

    paths: Tuple[Path, ...]
    labels: Tensor
    attributes: Tuple[str, ...]
    num_classes: Tuple[int, ...]
    listing: Path
    lines: Tuple[int, ...]

    def subset(self, indices: Union[Tensor, Sequence[int]]) -> "AttributeIndex":
        indices = torch.as_tensor(indices, dtype=torch.long)
        picked = indices.tolist()
        return AttributeIndex(tuple(self.paths[i] for i in picked), self.labels[indices], self.attributes,
                              self.num_classes, self.listing, tuple(self.lines[i] for i in picked))


def _data_lines(path: Path):
    """(line number, stripped text) of the non-empty lines of a text file, with a clear error if it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if text.strip():
                yield number, text.strip()


# ---- CelebA -------------------------------------------------------------------------------------


def read_celeba(root: PathLike) -> Tuple[AttributeIndex, Tensor]:
    """CelebA's labels and standard partition: (index of all images, partition [N] with 0/1/2).

    `root` holds `list_attr_celeba.txt`, `list_eval_partition.txt` and `img_align_celeba/`.
    Attribute values 1 / -1 become classes 1 / 0. Use `celeba_split(index, partition, "test")`.
    """
    root = Path(root)
    attr_path = root / "list_attr_celeba.txt"
    lines = iter(_data_lines(attr_path))
    (_, count_text), (_, header) = next(lines, (1, "")), next(lines, (2, ""))
    if not count_text.isdigit():
        raise ValueError(f"{attr_path}, line 1: expected the number of images, got {count_text!r}")
    names = tuple(header.split())
    if len(names) != len(CELEBA_ATTRIBUTES):
        raise ValueError(f"{attr_path}, line 2: expected {len(CELEBA_ATTRIBUTES)} attribute names, got {len(names)}")
    files, rows, numbers = [], [], []
    for number, text in lines:
        fields = text.split()
        if len(fields) != len(names) + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise ValueError(f"{attr_path}, line {number}: expected an image name and {len(names)} values "
                             f"of 1 or -1, got {text[:80]!r}")
        files.append(fields[0])
        rows.append([v == "1" for v in fields[1:]])
        numbers.append(number)
    if len(files) != int(count_text):
        raise ValueError(f"{attr_path}: line 1 announces {int(count_text)} images but {len(files)} are listed")

    partition_path = root / "list_eval_partition.txt"
    partition_of = {}
    for number, text in _data_lines(partition_path):
        fields = text.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{partition_path}, line {number}: expected an image name and 0, 1 or 2, got {text[:80]!r}")
        partition_of[fields[0]] = int(fields[1])
    missing = [name for name in files if name not in partition_of]
    if missing or len(partition_of) != len(files):
        detail = f"{missing[0]} (and {len(missing) - 1} more) are not in it" if missing else "it lists other images too"
        raise ValueError(f"{partition_path} must list exactly the images of {attr_path}: {detail}")
    partition = torch.tensor([partition_of[name] for name in files])
    sizes = tuple(int((partition == p).sum()) for p in range(3))
    if len(files) == sum(CELEBA_SPLIT_SIZES) and sizes != CELEBA_SPLIT_SIZES:
        raise ValueError(f"{partition_path}: expected the standard split {CELEBA_SPLIT_SIZES}, got {sizes}")

    index = AttributeIndex(
        paths=tuple(root / "img_align_celeba" / name for name in files),
        labels=torch.tensor(rows, dtype=torch.int64),
        attributes=names,
        num_classes=(2,) * len(names),
        listing=attr_path,
        lines=tuple(numbers),
    )
    return index, partition


def celeba_split(index: AttributeIndex, partition: Tensor, split: str) -> AttributeIndex:
    """The images of one standard split: "train" (162,770), "val" (19,867) or "test" (19,962)."""
    if split not in CELEBA_SPLITS:
        raise ValueError(f"split must be one of {CELEBA_SPLITS}, got {split!r}")
    return index.subset((partition == CELEBA_SPLITS.index(split)).nonzero().flatten())


# ---- X-Domain -----------------------------------------------------------------------------------


def read_xdomain(manifest: PathLike) -> AttributeIndex:
    """An X-Domain manifest (format in the module docstring)."""
    manifest = Path(manifest)
    lines = ((n, t) for n, t in _data_lines(manifest) if not t.startswith("#"))
    first = next(lines, None)
    if first is None:
        raise ValueError(f"{manifest} has no header line (image, then name:number_of_values per attribute)")
    number, header = first
    columns = header.split("\t")
    attributes, num_classes = [], []
    for column in columns[1:]:
        name, _, values = column.partition(":")
        if not name or not values.isdigit() or int(values) < 2:
            raise ValueError(f"{manifest}, line {number}: header column {column!r} must be name:number_of_values "
                             f"with at least 2 values")
        attributes.append(name)
        num_classes.append(int(values))
    if columns[0] != "image" or not attributes:
        raise ValueError(f"{manifest}, line {number}: the header must be 'image' and then at least one "
                         f"name:number_of_values column, tab-separated; got {header[:80]!r}")

    paths, rows, numbers = [], [], []
    for number, text in lines:
        fields = text.split("\t")
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            values = []
        if len(fields) != len(columns) or len(values) != len(attributes) or \
                any(not -1 <= v < c for v, c in zip(values, num_classes)):
            raise ValueError(f"{manifest}, line {number}: expected an image path and {len(attributes)} tab-separated "
                             f"values, each -1 or a class in 0..C-1 with C = {num_classes}; got {text[:80]!r}")
        path = Path(fields[0])
        paths.append(path if path.is_absolute() else manifest.parent / path)
        rows.append(values)
        numbers.append(number)
    if not paths:
        raise ValueError(f"{manifest} lists no images")
    return AttributeIndex(tuple(paths), torch.tensor(rows, dtype=torch.int64), tuple(attributes),
                          tuple(num_classes), manifest, tuple(numbers))


def xdomain_split(num_images: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """The paper's random split: (train indices, test indices), 165,467 / 80,000 of X-Domain's 245,467.

    For another number of images the test part keeps the same fraction (80,000 / 245,467).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be an int >= 2, got {num_images!r}")
    test_size = min(max(round(num_images * XDOMAIN_TEST_SIZE / XDOMAIN_SIZE), 1), num_images - 1)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[test_size:].sort().values, order[:test_size].sort().values


# ---- images ---------------------------------------------------------------------------------------


def load_image(path: PathLike, size: Tuple[int, int]) -> Tensor:
    """An RGB image as float [3, H, W] in [-1, 1]: the centred crop of aspect W:H, resized to `size` (H, W)."""
    from PIL import Image

    height, width = size
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        crop_w, crop_h = (round(h * width / height), h) if w * height > h * width else (w, round(w * height / width))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


class ImageAttributeDataset(Dataset):
    """`(image [3, H, W], labels [A])` pairs of an `AttributeIndex`, images loaded by `load_image`."""

    def __init__(self, index: AttributeIndex, size: Tuple[int, int]):
        if not isinstance(index, AttributeIndex):
            raise TypeError(f"index must be an AttributeIndex (from read_celeba or read_xdomain), "
                            f"got {type(index).__name__}")
        self.index = index
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        path = self.index.paths[i]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed in {self.index.listing}, line {self.index.lines[i]})")
        try:
            image = load_image(path, self.size)
        except OSError as error:
            raise ValueError(f"{path} (listed in {self.index.listing}, line {self.index.lines[i]}) "
                             f"is not a readable image: {error}") from error
        return image, self.index.labels[i]


# ---- offline stand-ins ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorAttributeDataset:
    """A small in-memory multi-attribute image dataset: images float [N, C, H, W], labels int64 [N, A]."""

    name: str
    attributes: Tuple[str, ...]
    num_classes: Tuple[int, ...]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    description: str

    @property
    def input_size(self) -> Tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def _long_tail_counts(total: int, num_classes: int, ratio: float) -> np.ndarray:
    """Class sizes falling geometrically from the largest to largest/ratio, summing to `total`."""
    shares = ratio ** (-np.arange(num_classes) / (num_classes - 1))
    counts = np.maximum(np.round(total * shares / shares.sum()).astype(int), 1)
    counts[0] += total - counts.sum()
    return counts


# The digit glyphs' closed loops (0, 4, 6, 9: one; 8: two) and whether the digit is prime.
_DIGIT_LOOPS = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])
_DIGIT_PRIME = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 0])


def digits_attributes(imbalance: float = 20.0, test_per_digit: int = 80, seed: int = 0) -> TensorAttributeDataset:
    """scikit-learn's 1,797 handwritten digits (8x8) as a long-tailed four-attribute task.

    A balanced test set of `test_per_digit` images per digit is held out first. From the rest,
    digit d keeps a share falling geometrically with d, so digit 0 has `imbalance` times as many
    training images as digit 9. Attributes: the digit (10 classes); its number of closed loops
    (0, 1, 2: "2" is the digit 8 alone); whether it is prime; and whether it is written with
    heavy ink (more ink than 90% of all images; the only attribute read from the pixels).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    target = digits.target
    ink = images.reshape(len(images), -1).sum(1)
    heavy = (ink > np.quantile(ink, 0.9)).astype(int)
    labels = np.stack([target, _DIGIT_LOOPS[target], _DIGIT_PRIME[target], heavy], 1)

    rng = np.random.default_rng(seed)
    train, test = [], []
    available = min(np.bincount(target)) - test_per_digit
    if available < 2:
        raise ValueError(f"test_per_digit={test_per_digit} leaves fewer than 2 training images per digit")
    keep = np.maximum(np.round(available * imbalance ** (-np.arange(10) / 9)).astype(int), 1)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(target == digit))
        test.append(members[:test_per_digit])
        train.append(members[test_per_digit:test_per_digit + keep[digit]])
    train, test = np.concatenate(train), np.concatenate(test)

    def tensors(rows):
        return torch.from_numpy(images[rows] * 2 - 1)[:, None], torch.from_numpy(labels[rows]).long()

    return TensorAttributeDataset(
        "digits", ("digit", "loops", "prime", "heavy_ink"), (10, 3, 2, 2), *tensors(train), *tensors(test),
        description=f"scikit-learn handwritten digits 8x8, digit 0..9 long-tailed 1:{imbalance:g} "
                    f"({len(train)} training images), balanced test set of {len(test)}",
    )


SHAPES_ATTRIBUTES = ("shape", "colour", "pattern", "size", "position", "background")
SHAPES_NUM_CLASSES = (6, 12, 6, 4, 5, 6)
SHAPES_IMBALANCE = (2, 50, 200, 1000, 2000, 4000)


def shapes_attributes(num_train: int = 16_000, num_test: int = 3_000, image_size: int = 16,
                      seed: int = 0) -> TensorAttributeDataset:
    """Procedurally drawn RGB images of one shape each, with six independent multi-valued attributes.

    shape (6: square, disc, triangle, diamond, cross, ring), colour (12 hues), fill pattern (6),
    size (4), position (5), background (6). In the training set the class sizes of each
    attribute fall geometrically, from 1:2 (shape) to 1:4000 (background), as in X-Domain
    (1:2 to 1:4162; with fewer than ~12,000 training images the rarest classes are floored at
    one image, so the ratios come out lower); the attributes are drawn independently. The test set draws
    every attribute uniformly, which estimates the same class-balanced accuracy with far less
    noise on the rare classes. All images get jitter (hue, size, position) and pixel noise.
    """
    if num_train < 100 or num_test < 1:
        raise ValueError(f"num_train must be >= 100 and num_test >= 1, got {num_train} and {num_test}")
    if image_size < 12:
        raise ValueError(f"image_size must be >= 12, got {image_size}")
    rng = np.random.default_rng(seed)
    train_labels = np.stack([rng.permutation(np.repeat(np.arange(c), _long_tail_counts(num_train, c, ratio)))
                             for c, ratio in zip(SHAPES_NUM_CLASSES, SHAPES_IMBALANCE)], 1)
    test_labels = np.stack([rng.integers(0, c, num_test) for c in SHAPES_NUM_CLASSES], 1)
    return TensorAttributeDataset(
        "shapes", SHAPES_ATTRIBUTES, SHAPES_NUM_CLASSES,
        _draw_shapes(train_labels, image_size, rng), torch.from_numpy(train_labels).long(),
        _draw_shapes(test_labels, image_size, rng), torch.from_numpy(test_labels).long(),
        description=f"procedural shapes {image_size}x{image_size}, six attributes imbalanced 1:2 to 1:4000 "
                    f"({num_train} training images), test set of {num_test} with uniform attributes",
    )


def _draw_shapes(labels: np.ndarray, size: int, rng: np.random.Generator) -> Tensor:
    """Renders `labels` [N, 6] (SHAPES_ATTRIBUTES order) as float [N, 3, size, size] in [-1, 1]."""
    n = len(labels)
    shape, colour, pattern, scale, position, background = labels.T
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    unit = size / 16  # the geometry below is laid out for 16x16 and scaled

    offsets = np.array([[0, 0], [-3, 0], [3, 0], [0, -3], [0, 3]], dtype=np.float32) * unit
    centre = (size - 1) / 2 + offsets[position] + rng.uniform(-0.7, 0.7, (n, 2)) * unit
    radius = ((2.5 + 1.1 * scale + rng.uniform(-0.3, 0.3, n)) * unit)[:, None, None]
    dx = x[None] - centre[:, 0, None, None]
    dy = y[None] - centre[:, 1, None, None]
    r = np.hypot(dx, dy)
    masks = np.stack([
        np.maximum(abs(dx), abs(dy)) <= radius * 0.85,  # square
        r <= radius,  # disc
        (dy >= -radius) & (dy <= radius * 0.8) & (abs(dx) <= (dy + radius) * 0.6),  # triangle
        abs(dx) + abs(dy) <= radius * 1.2,  # diamond
        ((abs(dx) <= radius / 3) & (abs(dy) <= radius)) | ((abs(dy) <= radius / 3) & (abs(dx) <= radius)),  # cross
        (r <= radius) & (r >= radius * 0.55),  # ring
    ], 1)
    mask = masks[np.arange(n), shape]

    xi, yi = x.astype(int), y.astype(int)
    fills = np.stack([
        np.ones_like(x),  # solid
        np.where(yi % 2 == 0, 1.0, 0.35),  # horizontal stripes
        np.where(xi % 2 == 0, 1.0, 0.35),  # vertical stripes
        np.where((xi + yi) % 2 == 0, 1.0, 0.35),  # checker
        np.where((xi % 3 == 0) & (yi % 3 == 0), 0.35, 1.0),  # dots
        np.where((xi + yi) % 4 < 2, 1.0, 0.35),  # diagonal stripes
    ]).astype(np.float32)
    fill = fills[pattern]

    rgb = _hue_to_rgb((colour + rng.uniform(-0.2, 0.2, n)) / SHAPES_NUM_CLASSES[1])  # [N, 3]

    backgrounds = np.stack([
        np.full_like(x, 0.05),  # dark
        np.full_like(x, 0.45),  # grey
        x / (size - 1) * 0.6,  # horizontal gradient
        y / (size - 1) * 0.6,  # vertical gradient
        np.where(((xi // 4) + (yi // 4)) % 2 == 0, 0.15, 0.4),  # coarse checks
        0.3 + 0.15 * np.sin(x * 1.3) * np.sin(y * 1.3),  # ripples
    ]).astype(np.float32)
    ground = backgrounds[background][:, None]

    images = np.where(mask[:, None], rgb[:, :, None, None] * fill[:, None], ground)
    images = images + rng.normal(0, 0.06, images.shape)
    return torch.from_numpy(np.clip(images, 0, 1).astype(np.float32) * 2 - 1)


def _hue_to_rgb(hue: np.ndarray) -> np.ndarray:
    """[N, 3]: fully saturated, bright colours of the given hues (in turns; 0 red, 1/3 green, 2/3 blue)."""
    h6 = (np.asarray(hue)[:, None] % 1.0) * 6
    return np.clip(np.stack([np.abs(h6 - 3) - 1, 2 - np.abs(h6 - 2), 2 - np.abs(h6 - 4)], 1)[:, :, 0], 0, 1)
