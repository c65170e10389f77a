"""The folder layout of a labelled image set, read and written in one place.

    ROOT/[SPLIT/]images/NAME.<png|jpg|...>     RGB images
    ROOT/[SPLIT/]masks/NAME.<png|...>          label masks, same stem (255 = ignore)
    ROOT/[SPLIT/]classes.json or ROOT/classes.json   JSON list of unique class names

It is what `neco.scenes` writes, what `neco bank build` reads as a support folder and what
`neco eval --dataset folder` reads. Each reader takes the caller's error type, so the client
raises `SupportSetError` and evaluation `DatasetError` for the same broken folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from neco.atomic import atomic_write_text
from neco.errors import InputError

IMAGES_DIR = "images"
MASKS_DIR = "masks"
CLASSES_FILE = "classes.json"
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class LayoutError(InputError):
    """A folder does not follow the image/mask layout (missing folder, mask, bad classes.json)."""


def read_class_names(path: Path, error: type[Exception] = LayoutError) -> list[str]:
    """Read a classes.json: a non-empty JSON list of unique strings."""
    try:
        names = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise error(f"{path} must hold a non-empty JSON list of class-name strings")
    if len(set(names)) != len(names):
        raise error(f"{path} lists a class name twice: {names}")
    return names


def find_class_names(folders: Sequence[Path], error: type[Exception] = LayoutError) -> list[str] | None:
    """The class names of the first `folders` entry holding a classes.json, or None."""
    for folder in dict.fromkeys(Path(f) for f in folders):
        if (folder / CLASSES_FILE).is_file():
            return read_class_names(folder / CLASSES_FILE, error)
    return None


def write_class_names(root: Path, names: Sequence[str]) -> Path:
    """Write `root/classes.json` (atomically)."""
    names = list(names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise LayoutError(f"class names must be a non-empty list of unique strings, got {names}")
    return atomic_write_text(Path(root) / CLASSES_FILE, json.dumps(names))


def image_mask_pairs(base: Path, error: type[Exception] = LayoutError) -> list[tuple[Path, Path]]:
    """(image, mask) paths of `base/images` and `base/masks`, matched by stem, sorted by name.

    Every image needs a mask (any image suffix); masks without an image are ignored.
    """
    images_dir, masks_dir = Path(base) / IMAGES_DIR, Path(base) / MASKS_DIR
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise error(f"folder {str(base)!r} must contain {IMAGES_DIR}/ and {MASKS_DIR}/")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = []
    for image in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if image.stem not in masks:
            raise error(f"image {str(image)!r} has no mask named {image.stem}.* in {masks_dir}")
        pairs.append((image, masks[image.stem]))
    return pairs
