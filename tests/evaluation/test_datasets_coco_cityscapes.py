"""Tiny COCO-Stuff and Cityscapes trees: label mapping (fine -> 27 coarse, labelIds -> 19 train ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.evaluation.datasets import (
    CITYSCAPES_CLASSES,
    COCO_FINE_TO_COARSE,
    COCO_STUFF27_CLASSES,
    MissingDatasetFileError,
    load_dataset,
)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_coco_stuff27(tmp_path: Path) -> None:
    base = tmp_path / "cocostuff"
    # fine ids: 0 person, 2 car, 16 dog (COCO id 18), 105 sky-other (COCO id 106), 123 grass, 255 unlabelled
    fine = np.array([[0, 2, 16], [105, 123, 255]], dtype=np.uint8)
    for name in ("000000000001", "000000000002"):
        _save(base / "images" / "val2017" / f"{name}.jpg", np.full((2, 3, 3), 100, np.uint8))
        _save(base / "annotations" / "val2017" / f"{name}.png", fine)
    assert len(load_dataset("coco-stuff", tmp_path, "val")) == 2
    (base / "curated" / "val2017").mkdir(parents=True)
    (base / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000002\n")
    dataset = load_dataset("coco-stuff", tmp_path, "val")
    assert len(dataset) == 1 and dataset.samples[0].name == "000000000002"
    names = [dataset.class_names[i] if i != 255 else None for i in dataset[0][1].ravel()]
    assert names == ["person-things", "vehicle-things", "animal-things", "sky-stuff", "plant-stuff", None]
    assert len(COCO_STUFF27_CLASSES) == 27 and len(COCO_FINE_TO_COARSE) == 182
    assert sorted(set(COCO_FINE_TO_COARSE)) == list(range(27))  # every coarse class is reachable
    with pytest.raises(MissingDatasetFileError):
        load_dataset("coco-stuff", tmp_path, "train")


def test_cityscapes(tmp_path: Path) -> None:
    ids = np.array([[7, 8, 26], [0, 33, 6]], dtype=np.uint8)  # road, sidewalk, car / unlabelled, bicycle, ground
    for split, city in (("train", "aachen"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        _save(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.zeros((2, 3, 3), np.uint8))
        _save(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
    val = load_dataset("cityscapes", tmp_path, "val")
    assert len(val) == 1 and val.class_names == list(CITYSCAPES_CLASSES) and len(CITYSCAPES_CLASSES) == 19
    np.testing.assert_array_equal(val[0][1], [[0, 1, 13], [255, 18, 255]])
    with pytest.raises(MissingDatasetFileError, match="test"):
        load_dataset("cityscapes", tmp_path, "test")
