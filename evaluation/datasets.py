"""Segmentation datasets for evaluation: Pascal VOC 2012, ADE20k, a generic folder layout, and
(in `datasets_extra`) COCO-Stuff-27 and Cityscapes.

A dataset is a read-only sequence of `(image, mask)` pairs — image HxWx3 uint8 RGB, mask HxW
uint8 with `IGNORE_INDEX` for unlabelled pixels — plus `class_names`. That is exactly the
"(image, mask) pairs" support set the client's `MemoryBank.build` accepts, so evaluation and
applications build banks the same way. Label mapping to the contiguous 0..C-1 + 255
convention happens here, once per dataset, so nothing downstream knows about dataset quirks.

Files are listed eagerly (a missing directory or split file fails at construction) and read
lazily (a missing or mis-sized file fails when that sample is read, naming the file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from neco.client import load_mask, load_rgb
from neco.contract import IGNORE_INDEX
from neco.errors import InputError
from neco.layout import CLASSES_FILE, IMAGE_SUFFIXES, IMAGES_DIR, MASKS_DIR, find_class_names

DatasetKind = Literal["voc", "ade20k", "coco-stuff", "cityscapes", "folder"]

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
"""The 150 SceneParsing classes in annotation order (annotation value i+1 -> class i)."""


class DatasetError(InputError):
    """A dataset tree, split or sample is malformed; the message names the file."""


class MissingDatasetFileError(DatasetError, FileNotFoundError):
    """A file or directory the layout requires does not exist."""


@dataclass(frozen=True)
class SamplePaths:
    name: str
    image: Path
    mask: Path


def _identity(mask: np.ndarray) -> np.ndarray:
    return mask


def ade20k_label_map(mask: np.ndarray) -> np.ndarray:
    """ADE20k stores 0 for "other" (ignored by the benchmark) and classes as 1..150."""
    out = mask.astype(np.int16) - 1
    out[mask == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


class SegmentationDataset(Sequence[tuple[np.ndarray, np.ndarray]]):
    """Lazily-read (image, mask) pairs with contiguous labels 0..C-1 and 255 = ignore."""

    def __init__(
        self,
        name: str,
        split: str,
        samples: Sequence[SamplePaths],
        class_names: Sequence[str],
        label_map: Callable[[np.ndarray], np.ndarray] = _identity,
    ) -> None:
        if not samples:
            raise DatasetError(f"{name} split {split!r} has no samples")
        self.name = name
        self.split = split
        self.samples = list(samples)
        self.class_names = list(class_names)
        self._label_map = label_map

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = self._label_map(read_mask(sample.mask))
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but its mask "
                f"{sample.mask} is {mask.shape[1]}x{mask.shape[0]}"
            )
        labels = mask[mask != IGNORE_INDEX]
        if labels.size and int(labels.max()) >= len(self.class_names):
            raise DatasetError(
                f"mask {sample.mask} holds label {int(labels.max())} but {self.name} has "
                f"{len(self.class_names)} classes"
            )
        return image, mask

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def subset(self, fraction: int, seed: int = 0) -> SegmentationDataset:
        """A seeded 1/`fraction` subset (at least one sample), kept in file order."""
        if fraction < 1:
            raise DatasetError(f"subset fraction must be >= 1 (1/N of the split), got {fraction}")
        if fraction == 1:
            return self
        count = max(1, len(self.samples) // fraction)
        keep = np.sort(np.random.default_rng(seed).permutation(len(self.samples))[:count])
        return SegmentationDataset(
            self.name, f"{self.split}[1/{fraction}]", [self.samples[i] for i in keep], self.class_names, self._label_map
        )


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise MissingDatasetFileError(f"missing file {path}")
    return path


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 via the client's decoder (EXIF orientation, grey/palette/alpha handling)."""
    return load_rgb(_existing(path))


def read_mask(path: Path) -> np.ndarray:
    """Label indices via the client's decoder: palette PNGs give indices, never colours."""
    mask = load_mask(_existing(path))
    if mask.max(initial=0) > 255:
        raise DatasetError(f"mask {path} holds label {int(mask.max())} > 255")
    return mask.astype(np.uint8)


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise MissingDatasetFileError(f"missing directory {path}")
    return path


def _find_root(root: Path, marker: str, candidates: Sequence[str]) -> Path:
    """Accept the dataset directory itself or one of its usual parents."""
    for candidate in (root, *(root / c for c in candidates)):
        if (candidate / marker).exists():
            return candidate
    tried = ", ".join(str(root / c / marker) for c in ("", *candidates))
    raise MissingDatasetFileError(f"no {marker} under {root} (tried {tried})")


def voc(root: str | Path, split: str, mask_dir: str = "auto") -> SegmentationDataset:
    """Pascal VOC 2012 from `ImageSets/Segmentation/<split>.txt`.

    `mask_dir="auto"` prefers `SegmentationClassAug` (the 10,582-image augmented set, whose
    `train_aug` split the Hummingbird protocol uses) when present, else `SegmentationClass`.
    """
    base = _find_root(Path(root), "JPEGImages", ("VOC2012", "VOCdevkit/VOC2012"))
    if mask_dir == "auto":
        mask_dir = "SegmentationClassAug" if (base / "SegmentationClassAug").is_dir() else "SegmentationClass"
    masks = _require_dir(base / mask_dir)
    split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise MissingDatasetFileError(f"missing split file {split_file}")
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    samples = [SamplePaths(n, base / "JPEGImages" / f"{n}.jpg", masks / f"{n}.png") for n in names]
    return SegmentationDataset("voc", split, samples, VOC_CLASSES)


ADE20K_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def ade20k(root: str | Path, split: str) -> SegmentationDataset:
    """ADE20k SceneParsing (`ADEChallengeData2016`), 150 classes, annotation 0 ignored."""
    if split not in ADE20K_SPLITS:
        raise DatasetError(f"unknown ADE20k split {split!r}; use one of {sorted(ADE20K_SPLITS)}")
    base = _find_root(Path(root), "annotations", ("ADEChallengeData2016",))
    sub = ADE20K_SPLITS[split]
    images = _require_dir(base / "images" / sub)
    masks = _require_dir(base / "annotations" / sub)
    samples = [SamplePaths(p.stem, p, masks / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
    return SegmentationDataset("ade20k", split, samples, ADE20K_CLASSES, ade20k_label_map)


def folder(root: str | Path, split: str | None = None, class_names: Sequence[str] | None = None) -> SegmentationDataset:
    """`<root>/[<split>/]images/*` with same-stem `masks/*.png`; classes from `classes.json`.

    This is the layout `neco.scenes.write_scene_dataset` writes (`classes.json` at the root,
    one sub-folder per split) and the simplest layout for users' own data.
    """
    root = Path(root)
    base = root / split if split is not None and (root / split).is_dir() else root
    images = _require_dir(base / IMAGES_DIR)
    masks = _require_dir(base / MASKS_DIR)
    if class_names is None:
        class_names = _read_class_names(base, root)
    samples = [
        SamplePaths(p.stem, p, masks / f"{p.stem}.png")
        for p in sorted(images.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return SegmentationDataset("folder", split or "all", samples, class_names)


def _read_class_names(*dirs: Path) -> list[str]:
    names = find_class_names(dirs, DatasetError)
    if names is None:
        raise MissingDatasetFileError(f"missing {CLASSES_FILE} in {' or '.join(str(d) for d in dict.fromkeys(dirs))}")
    return names


def load_dataset(
    kind: DatasetKind, root: str | Path, split: str, subset: int = 1, seed: int = 0
) -> SegmentationDataset:
    """Dispatch on the `--dataset` flag, then take the 1/`subset` fraction."""
    if kind == "voc":
        dataset = voc(root, split)
    elif kind == "ade20k":
        dataset = ade20k(root, split)
    elif kind == "folder":
        dataset = folder(root, split)
    elif kind in ("coco-stuff", "cityscapes"):
        from neco.evaluation.datasets_extra import cityscapes, coco_stuff27

        dataset = coco_stuff27(root, split) if kind == "coco-stuff" else cityscapes(root, split)
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}; use voc, ade20k, coco-stuff, cityscapes or folder")
    return dataset.subset(subset, seed)
