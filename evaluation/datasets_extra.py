"""COCO-Stuff-27 and Cityscapes (19 classes) in the (image, mask) convention of `datasets`.

COCO-Stuff-27: the curated coarse split of the unsupervised / dense-SSL literature (IIC, Ji et al.
2019; STEGO, Hamilton et al. 2022; used by Leopart and NeCo). Masks are the official
`stuffthingmaps_trainval2017` PNGs, whose values are COCO-Stuff category id - 1 (0-90 things, 91-181
stuff, 255 unlabelled); each fine class maps to one of 27 coarse classes (COCO's 12 thing and 15
stuff supercategories; `COCO_FINE_TO_COARSE`, the mapping STEGO's data.py publishes). Layout
(STEGO's): `<root>/images/{train2017,val2017}/*.jpg`, `<root>/annotations/{train2017,val2017}/*.png`
and, when present, the curated image list `<root>/curated/<split>/Coco164kFull_Stuff_Coarse_7.txt`
(otherwise every image of the split is used).

Cityscapes: `leftImg8bit/<split>/<city>/<name>_leftImg8bit.png` with
`gtFine/<split>/<city>/<name>_gtFine_labelIds.png`; the 34 label ids map to the 19 benchmark
train ids (all others ignored), as the official cityscapesScripts `labels.py` defines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neco.contract import IGNORE_INDEX
from neco.evaluation.datasets import (
    DatasetError,
    MissingDatasetFileError,
    SamplePaths,
    SegmentationDataset,
    _find_root,
    _require_dir,
)

COCO_STUFF27_CLASSES: tuple[str, ...] = (
    "electronic-things", "appliance-things", "food-things", "furniture-things", "indoor-things",
    "kitchen-things", "accessory-things", "animal-things", "outdoor-things", "person-things",
    "sports-things", "vehicle-things", "ceiling-stuff", "floor-stuff", "food-stuff", "furniture-stuff",
    "rawmaterial-stuff", "textile-stuff", "wall-stuff", "window-stuff", "building-stuff", "ground-stuff",
    "plant-stuff", "sky-stuff", "solid-stuff", "structural-stuff", "water-stuff",
)  # fmt: skip
"""Coarse classes 0-11 (thing supercategories) and 12-26 (stuff supercategories)."""

COCO_FINE_TO_COARSE: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,  # 0-24
    6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5,  # 25-50
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0,  # 51-76
    1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4,  # 77-90
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21,  # 91-110
    15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17,  # 111-130
    16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20,  # 131-150
    17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18,  # 151-170
    18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24,  # 171-181
)  # fmt: skip
"""Coarse class of each stuffthingmaps value 0..181 (COCO-Stuff category id - 1)."""

COCO_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
COCO_SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)  # fmt: skip
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
"""labelId -> trainId of the 19 evaluated classes; every other labelId is ignored."""


def _lookup(table: dict[int, int] | tuple[int, ...]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    items = table.items() if isinstance(table, dict) else enumerate(table)
    for fine, coarse in items:
        lut[fine] = coarse
    return lut


_COCO_LUT = _lookup(COCO_FINE_TO_COARSE)
_CITYSCAPES_LUT = _lookup(CITYSCAPES_TRAIN_IDS)


def coco_label_map(mask: np.ndarray) -> np.ndarray:
    """stuffthingmaps values (0-181, 255) -> 27 coarse classes (255 stays ignored)."""
    return _COCO_LUT[mask]


def cityscapes_label_map(mask: np.ndarray) -> np.ndarray:
    """gtFine labelIds -> the 19 train ids, everything else 255."""
    return _CITYSCAPES_LUT[mask]


def coco_stuff27(root: str | Path, split: str) -> SegmentationDataset:
    """COCO-Stuff-27 (curated list when present), stuffthingmaps mapped to 27 coarse classes."""
    if split not in COCO_SPLITS:
        raise DatasetError(f"unknown COCO-Stuff split {split!r}; use one of {sorted(COCO_SPLITS)}")
    base = _find_root(Path(root), "annotations", ("cocostuff", "coco"))
    sub = COCO_SPLITS[split]
    images = _require_dir(base / "images" / sub)
    masks = _require_dir(base / "annotations" / sub)
    curated = base / "curated" / sub / COCO_CURATED_LIST
    if curated.is_file():
        names = [line.strip() for line in curated.read_text().splitlines() if line.strip()]
    else:
        names = [p.stem for p in sorted(images.glob("*.jpg"))]
    samples = [SamplePaths(n, images / f"{n}.jpg", masks / f"{n}.png") for n in names]
    return SegmentationDataset("coco-stuff", split, samples, COCO_STUFF27_CLASSES, coco_label_map)


def cityscapes(root: str | Path, split: str) -> SegmentationDataset:
    """Cityscapes fine annotations, 19 train-id classes."""
    base = _find_root(Path(root), "leftImg8bit", ("cityscapes",))
    images = _require_dir(base / "leftImg8bit" / split)
    labels = _require_dir(base / "gtFine" / split)
    suffix = "_leftImg8bit.png"
    samples = []
    for path in sorted(images.glob(f"*/*{suffix}")):
        stem = path.name[: -len(suffix)]
        samples.append(SamplePaths(stem, path, labels / path.parent.name / f"{stem}_gtFine_labelIds.png"))
    if not samples:
        raise MissingDatasetFileError(f"no <city>/*{suffix} files under {images}")
    return SegmentationDataset("cityscapes", split, samples, CITYSCAPES_CLASSES, cityscapes_label_map)
