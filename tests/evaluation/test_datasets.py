"""Tiny trees of each dataset layout: loading, label mapping, split handling, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.contract import IGNORE_INDEX
from neco.evaluation.datasets import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    DatasetError,
    MissingDatasetFileError,
    load_dataset,
)
from neco.scenes import write_scene_dataset


def _image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        # A VOC-like palette whose colours differ from the indices: reading must give indices.
        img.putpalette([(i * 37) % 256 for i in range(256 * 3)])
    img.save(path)


def _labels(shape: tuple[int, int], values: list[int]) -> np.ndarray:
    return np.resize(np.array(values, dtype=np.uint8), shape[0] * shape[1]).reshape(shape)


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    names = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    for split, items in names.items():
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(items) + "\n")
        for i, name in enumerate(items):
            _image(base / "JPEGImages" / f"{name}.jpg", (20, 16), i)
            _mask(
                base / "SegmentationClass" / f"{name}.png", _labels((16, 20), [0, 15, 20, IGNORE_INDEX]), palette=True
            )
    return tmp_path


def test_voc_palette_indices_and_splits(voc_root: Path) -> None:
    train = load_dataset("voc", voc_root, "train")
    val = load_dataset("voc", voc_root, "val")
    assert len(train) == 2 and len(val) == 1
    assert train.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 21
    image, mask = val[0]
    assert image.shape == (16, 20, 3) and image.dtype == np.uint8
    assert mask.shape == (16, 20) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, _labels((16, 20), [0, 15, 20, IGNORE_INDEX]))
    # Also accepts the VOC2012 directory itself.
    assert len(load_dataset("voc", voc_root / "VOCdevkit" / "VOC2012", "train")) == 2


def test_voc_missing_split_and_file(voc_root: Path) -> None:
    with pytest.raises(MissingDatasetFileError, match="trainaug.txt"):
        load_dataset("voc", voc_root, "trainaug")
    (voc_root / "VOCdevkit/VOC2012/JPEGImages/2007_000002.jpg").unlink()
    train = load_dataset("voc", voc_root, "train")
    with pytest.raises(MissingDatasetFileError, match="2007_000002.jpg"):
        train[1]


def test_ade20k_label_shift(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    for sub, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            _image(base / "images" / sub / f"ADE_{sub}_{i:08d}.jpg", (12, 10), i)
            _mask(base / "annotations" / sub / f"ADE_{sub}_{i:08d}.png", _labels((10, 12), [0, 1, 150, 7]))
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    train = load_dataset("ade20k", tmp_path, "train")
    val = load_dataset("ade20k", base, "validation")
    assert len(train) == 3 and len(val) == 2
    _, mask = val[0]
    np.testing.assert_array_equal(mask, _labels((10, 12), [IGNORE_INDEX, 0, 149, 6]))
    with pytest.raises(DatasetError, match="unknown ADE20k split"):
        load_dataset("ade20k", tmp_path, "test")


def _folder(root: Path, splits: dict[str, int] | None, classes: list[str]) -> None:
    for split, n in (splits or {"": 3}).items():
        for i in range(n):
            _image(root / split / "images" / f"{i:04d}.png", (14, 14), i)
            _mask(root / split / "masks" / f"{i:04d}.png", _labels((14, 14), [0, 1, 2]))
    (root / "classes.json").write_text(json.dumps(classes))


def test_folder_flat_and_split(tmp_path: Path) -> None:
    _folder(tmp_path / "flat", None, ["bg", "a", "b"])
    flat = load_dataset("folder", tmp_path / "flat", "train")
    assert len(flat) == 3 and flat.class_names == ["bg", "a", "b"]
    _folder(tmp_path / "split", {"train": 4, "val": 2}, ["bg", "a", "b"])
    assert len(load_dataset("folder", tmp_path / "split", "train")) == 4
    assert len(load_dataset("folder", tmp_path / "split", "val")) == 2
    image, mask = load_dataset("folder", tmp_path / "split", "val")[1]
    assert image.shape == (14, 14, 3) and set(np.unique(mask)) == {0, 1, 2}


def test_scene_dataset_layout(tmp_path: Path) -> None:
    root = write_scene_dataset(tmp_path / "scenes", splits={"train": 3, "val": 2}, size=(56, 56))
    val = load_dataset("folder", root, "val")
    image, mask = val[0]
    assert len(val) == 2 and image.shape == (56, 56, 3) and mask.shape == (56, 56)
    assert int(mask.max()) < len(val.class_names)


def test_subset_is_seeded_fraction(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": 16}, ["bg", "a", "b"])
    full = load_dataset("folder", tmp_path, "train")
    eighth = load_dataset("folder", tmp_path, "train", subset=8, seed=3)
    assert len(eighth) == 2
    assert [s.name for s in eighth.samples] == [
        s.name for s in load_dataset("folder", tmp_path, "train", subset=8, seed=3).samples
    ]
    assert {s.name for s in eighth.samples} <= {s.name for s in full.samples}
    with pytest.raises(DatasetError, match=">= 1"):
        full.subset(0)


def test_folder_errors(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": 2}, ["bg", "a"])
    with pytest.raises(MissingDatasetFileError, match="images"):
        load_dataset("folder", tmp_path / "nope", "train")
    ds = load_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match="holds label 2"):
        ds[0]  # masks use label 2 but classes.json lists only 2 classes
    _mask(tmp_path / "train" / "masks" / "0001.png", np.zeros((7, 14)))
    ds = load_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"0001.png is 14x7"):
        ds[1]
    (tmp_path / "train" / "masks" / "0000.png").unlink()
    with pytest.raises(MissingDatasetFileError, match="0000.png"):
        ds[0]
    (tmp_path / "classes.json").write_text("{}")
    with pytest.raises(DatasetError, match="classes.json must hold"):
        load_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        load_dataset("coco", tmp_path, "train")  # type: ignore[arg-type]
