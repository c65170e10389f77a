"""Segmentation datasets for evaluation: Pascal VOC 2012, ADE20k, a generic folder layout,
COCO-Stuff-27 and Cityscapes.

A dataset is a read-only sequence of `(image, mask)` pairs — image HxWx3 uint8 RGB, mask HxW
uint8 with `IGNORE_INDEX` for unlabelled pixels — plus `class_names`. That is exactly the
"(image, mask) pairs" support set the client's `MemoryBank.build` accepts, so evaluation and
applications build banks the same way. Label mapping to the contiguous 0..C-1 + 255
convention happens here, once per dataset, so nothing downstream knows about dataset quirks.

Files are listed eagerly (a missing directory or split file fails at construction) and read
lazily (a missing or mis-sized file fails when that sample is read, naming the file).

COCO-Stuff-27 and Cityscapes (19 classes) in the (image, mask) convention of `datasets`.

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
        dataset = coco_stuff27(root, split) if kind == "coco-stuff" else cityscapes(root, split)
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}; use voc, ade20k, coco-stuff, cityscapes or folder")
    return dataset.subset(subset, seed)
