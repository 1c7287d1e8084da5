"""Dataset readers (CelebA, X-Domain manifest) on tiny files in the real formats, and the offline builders."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import paper.data
from crl_ops.metrics import class_counts, imbalance_ratios
from paper.data import (
    CELEBA_ATTRIBUTES,
    ImageAttributeDataset,
    celeba_split,
    digits_attributes,
    load_image,
    read_celeba,
    read_xdomain,
    shapes_attributes,
    xdomain_split,
)
from paper.models import XDOMAIN_ATTRIBUTES

XDOMAIN_FIXTURE_CLASSES = (4, 6, 3, 3, 5, 3, 4, 3, 2)


def write_celeba(root: Path, partitions=(0,) * 16 + (1,) * 4 + (2,) * 8, seed: int = 0) -> np.ndarray:
    """A CelebA folder with one image per entry of `partitions`; returns the 0/1 labels [N, 40]."""
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for name in names:
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)  # CelebA's aligned size
        Image.fromarray(pixels).save(root / "img_align_celeba" / name)
    labels = (rng.random((len(names), 40)) < 0.3).astype(int)
    labels[:2] = [[0], [1]]  # both classes of every attribute appear
    lines = [str(len(names)), " ".join(CELEBA_ATTRIBUTES) + " "]
    # CelebA pads the values with spaces to two characters ("  1", " -1").
    lines += [name + "".join(f" {2 * v - 1:2d}" for v in row) for name, row in zip(names, labels)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
    return labels


def write_xdomain(root: Path, count: int = 30, seed: int = 0) -> np.ndarray:
    """An X-Domain manifest with `count` small shop images; returns the labels [N, 9] (-1 = unannotated)."""
    rng = np.random.default_rng(seed)
    (root / "shop").mkdir(parents=True)
    labels = np.stack([rng.integers(0, c, count) for c in XDOMAIN_FIXTURE_CLASSES], 1)
    labels[rng.random(labels.shape) < 0.15] = -1
    header = "\t".join(["image", *(f"{a}:{c}" for a, c in zip(XDOMAIN_ATTRIBUTES, XDOMAIN_FIXTURE_CLASSES))])
    lines = ["# X-Domain test fixture", header]
    for i, row in enumerate(labels):
        Image.fromarray(rng.integers(0, 256, (40 + i % 7, 30, 3), dtype=np.uint8)).save(root / "shop" / f"{i}.jpg")
        lines.append("\t".join([f"shop/{i}.jpg", *map(str, row)]))
    (root / "manifest.tsv").write_text("\n".join(lines) + "\n")
    return labels


# ---- CelebA -----------------------------------------------------------------------------------------


def test_celeba_reader_labels_partition_and_images(tmp_path):
    labels = write_celeba(tmp_path)
    index, partition = read_celeba(tmp_path)
    assert index.attributes == CELEBA_ATTRIBUTES and index.num_classes == (2,) * 40
    assert torch.equal(index.labels, torch.from_numpy(labels))
    assert partition.tolist() == [0] * 16 + [1] * 4 + [2] * 8
    test = celeba_split(index, partition, "test")
    assert [p.name for p in test.paths] == [f"{i:06d}.jpg" for i in range(21, 29)]
    assert test.lines == tuple(range(23, 31))  # two header lines before the first image
    image, row = ImageAttributeDataset(test, (55, 47))[0]
    assert image.shape == (3, 55, 47) and image.dtype == torch.float32
    assert -1 <= image.min() < image.max() <= 1
    assert torch.equal(row, torch.from_numpy(labels[20]))


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines.__setitem__(3, lines[3].replace(" -1", "  0", 1).replace("  1", "  0", 1)),
     "list_attr_celeba.txt, line 4: expected an image name and 40 values"),
    (lambda lines: lines.__setitem__(0, "abc"), "line 1: expected the number of images"),
    (lambda lines: lines.__setitem__(1, "Smiling Young"), "line 2: expected 40 attribute names, got 2"),
    (lambda lines: lines.pop(), "line 1 announces 28 images but 27 are listed"),
])
def test_celeba_reader_names_the_malformed_line(tmp_path, edit, message):
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_celeba(tmp_path)


def test_celeba_reader_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt is missing"):
        read_celeba(tmp_path)
    write_celeba(tmp_path)
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace("000005.jpg 0", "000005.jpg 3"))
    with pytest.raises(ValueError, match="list_eval_partition.txt, line 5: expected an image name and 0, 1 or 2"):
        read_celeba(tmp_path)
    partition.write_text(partition.read_text().replace("000005.jpg 3\n", ""))
    with pytest.raises(ValueError, match="must list exactly the images.*000005.jpg"):
        read_celeba(tmp_path)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt is missing"):
        read_celeba(tmp_path)


def test_missing_image_names_the_listing_and_line(tmp_path):
    write_celeba(tmp_path)
    index, partition = read_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000021.jpg").unlink()
    dataset = ImageAttributeDataset(celeba_split(index, partition, "test"), (55, 47))
    with pytest.raises(FileNotFoundError, match=r"000021.jpg is missing \(listed in .*list_attr_celeba.txt, line 23\)"):
        dataset[0]
    (tmp_path / "img_align_celeba" / "000022.jpg").write_text("not a jpeg")
    with pytest.raises(ValueError, match="000022.jpg .*line 24.* is not a readable image"):
        dataset[1]


def test_celeba_split_name_is_checked(tmp_path):
    write_celeba(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        celeba_split(*read_celeba(tmp_path), "validation")


# ---- X-Domain ---------------------------------------------------------------------------------------


def test_xdomain_manifest_reader(tmp_path):
    labels = write_xdomain(tmp_path)
    index = read_xdomain(tmp_path / "manifest.tsv")
    assert index.attributes == XDOMAIN_ATTRIBUTES and index.num_classes == XDOMAIN_FIXTURE_CLASSES
    assert torch.equal(index.labels, torch.from_numpy(labels))
    assert index.paths[3] == tmp_path / "shop" / "3.jpg" and index.lines[3] == 6
    image, _ = ImageAttributeDataset(index, (128, 128))[3]
    assert image.shape == (3, 128, 128)


@pytest.mark.parametrize("line, replacement, message", [
    (1, "image\tcategory:4\tcolour", "header column 'colour' must be name:number_of_values"),
    (1, "path\tcategory:4", "the header must be 'image'"),
    (2, "shop/0.jpg\t1\t2", r"line 3: expected an image path and 9 tab-separated values"),
    (3, "shop/1.jpg\t4\t0\t0\t0\t0\t0\t0\t0\t0", r"line 4: expected .* C = \[4, 6, 3"),
    (4, "shop/2.jpg\tx\t0\t0\t0\t0\t0\t0\t0\t0", "line 5: expected"),
])
def test_xdomain_manifest_errors_name_the_line(tmp_path, line, replacement, message):
    write_xdomain(tmp_path)
    manifest = tmp_path / "manifest.tsv"
    lines = manifest.read_text().splitlines()
    lines[line] = replacement
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_xdomain(manifest)


def test_xdomain_manifest_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.tsv is missing"):
        read_xdomain(tmp_path / "manifest.tsv")
    (tmp_path / "manifest.tsv").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="has no header line"):
        read_xdomain(tmp_path / "manifest.tsv")
    (tmp_path / "manifest.tsv").write_text("image\tcategory:4\n")
    with pytest.raises(ValueError, match="lists no images"):
        read_xdomain(tmp_path / "manifest.tsv")


def test_xdomain_split_is_the_papers_and_fixed():
    train, test = xdomain_split(245_467)
    assert (len(train), len(test)) == (165_467, 80_000)
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(245_467))
    again, _ = xdomain_split(245_467)
    other, _ = xdomain_split(245_467, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    assert [len(part) for part in xdomain_split(30)] == [20, 10]
    with pytest.raises(ValueError, match="num_images must be an int >= 2"):
        xdomain_split(1)


def test_load_image_crops_to_the_aspect_ratio(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white centre square in a wide black image
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", (8, 8))
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image, torch.ones_like(image))  # the crop is the centre square only


# ---- offline stand-ins ------------------------------------------------------------------------------


def test_digits_attributes_long_tail_and_derived_labels():
    data = digits_attributes(imbalance=20.0, test_per_digit=80)
    counts = class_counts(data.train_labels, data.num_classes)
    digit_counts = counts[0].tolist()
    assert digit_counts == sorted(digit_counts, reverse=True)
    assert 17 <= digit_counts[0] / digit_counts[9] <= 23
    assert class_counts(data.test_labels, data.num_classes)[0].tolist() == [80] * 10
    digits = data.train_labels[:, 0]
    assert torch.equal(data.train_labels[:, 1] == 2, digits == 8)  # two loops: the digit 8 alone
    assert torch.equal(data.train_labels[:, 2] == 1, torch.isin(digits, torch.tensor([2, 3, 5, 7])))
    assert data.train_images.shape[1:] == (1, 8, 8) and data.input_size == (1, 8, 8)
    assert -1 <= data.train_images.min() and data.train_images.max() <= 1


def test_shapes_attributes_reach_x_domain_like_imbalance():
    data = shapes_attributes(num_train=16_000, num_test=60)
    ratios = imbalance_ratios(data.train_labels, data.num_classes)
    assert ratios[0] < 2.5 and 3000 < ratios[-1] < 5000
    assert torch.all(ratios[1:] >= ratios[:-1] * 0.9)  # rising imbalance, attribute by attribute
    assert data.train_images.shape == (16_000, 3, 16, 16)


def test_shapes_attributes_are_fixed_by_the_seed():
    first, again = (shapes_attributes(num_train=300, num_test=60) for _ in range(2))
    other = shapes_attributes(num_train=300, num_test=60, seed=1)
    assert torch.equal(again.train_images, first.train_images) and torch.equal(again.test_labels, first.test_labels)
    assert not torch.equal(other.train_labels, first.train_labels)


def test_shapes_attributes_draw_what_the_labels_say():
    data = shapes_attributes(num_train=200, num_test=600, seed=3)
    images, labels = data.test_images, data.test_labels
    # Colour 0 is red, 4 green, 8 blue: the shape's dominant channel must follow.
    for hue, channel in ((0, 0), (4, 1), (8, 2)):
        chosen = (labels[:, 1] == hue) & (labels[:, 2] == 0)  # solid fill
        brightest = images[chosen].flatten(2).max(2).values  # per image and channel
        assert (brightest.argmax(1) == channel).float().mean() > 0.9
    # Size: on the dark background, a larger size class lights up more pixels.
    dark = labels[:, 5] == 0
    area = (images.amax(1) > 0).flatten(1).sum(1).float()
    mean_area = [area[dark & (labels[:, 3] == size)].mean() for size in range(4)]
    assert mean_area == sorted(mean_area)
    assert shapes_attributes(num_train=200, num_test=10, image_size=24).train_images.shape[-1] == 24
    with pytest.raises(ValueError, match="num_train must be >= 100"):
        shapes_attributes(num_train=50)


def test_celeba_full_size_must_have_the_standard_split(tmp_path, monkeypatch):
    write_celeba(tmp_path)  # 28 images: 16 / 4 / 8
    monkeypatch.setattr(paper.data, "CELEBA_SPLIT_SIZES", (16, 4, 8))
    read_celeba(tmp_path)
    monkeypatch.setattr(paper.data, "CELEBA_SPLIT_SIZES", (15, 5, 8))  # a "full" set split otherwise
    with pytest.raises(ValueError, match=r"expected the standard split \(15, 5, 8\), got \(16, 4, 8\)"):
        read_celeba(tmp_path)
