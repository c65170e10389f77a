"""The page's clickable examples: generated scenes, plus any support folder given with `--examples DIR`.

An example is one support image with its mask (shown in the painter, editable) and a few query
images, so a first visit can show a result without preparing anything. Everything is encoded
to PNG once, when the app starts, and served from memory by `neco.app.server`.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from neco.client import load_mask, load_rgb
from neco.errors import InputError
from neco.layout import IMAGES_DIR, LayoutError, find_class_names, image_mask_pairs
from neco.scenes import SCENE_FAMILIES, generate_scene

SCENE_SIZE = (112, 112)
"""Generated examples are small: the embedded CPU server segments four of them in about a second."""
SCENE_QUERIES = 3
FOLDER_QUERIES = 4
"""Images after the first one of an `--examples` folder offered as queries (the first is the support)."""
EXAMPLE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class ExampleError(InputError):
    """An `--examples` folder that holds no usable support image with its mask."""


@dataclass(frozen=True)
class Example:
    """One support image with its mask, its class names and the query images offered with it."""

    id: str
    title: str
    classes: list[str]
    support: bytes
    """PNG of the support image."""
    mask: np.ndarray
    """(H, W) uint8 labels of the support image (255 = ignore), sent to the painter as raw bytes."""
    queries: list[bytes]

    def describe(self) -> dict[str, object]:
        """The JSON the page needs: names, the mask's labels (base64 bytes) and the picture URLs."""
        height, width = self.mask.shape
        base = f"api/examples/{self.id}"
        return {
            "id": self.id,
            "title": self.title,
            "classes": self.classes,
            "support": {"url": f"{base}/support.png", "height": height, "width": width},
            "labels": base64.b64encode(np.ascontiguousarray(self.mask, dtype=np.uint8).tobytes()).decode("ascii"),
            "queries": [f"{base}/query/{i}.png" for i in range(len(self.queries))],
        }


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_examples(seed: int = 0) -> list[Example]:
    """One example per family of `neco.scenes`: a support scene and `SCENE_QUERIES` others, all 112 px."""
    examples = []
    for family, names in SCENE_FAMILIES.items():
        rng = np.random.default_rng(seed)
        scenes = [generate_scene(rng, size=SCENE_SIZE, num_classes=4, family=family) for _ in range(SCENE_QUERIES + 1)]
        examples.append(
            Example(
                id=f"scenes-{family}",
                title=f"generated scenes ({family})",
                classes=list(names[:4]),
                support=png_bytes(scenes[0][0]),
                mask=scenes[0][1],
                queries=[png_bytes(image) for image, _ in scenes[1:]],
            )
        )
    return examples


def folder_example(folder: Path, max_pixels: int) -> Example:
    """An example from a support folder (`images/`, `masks/`, optional `classes.json`).

    The first image (by name) is the support; the next `FOLDER_QUERIES` images are the queries.
    """
    try:
        pairs = image_mask_pairs(folder)
        names = find_class_names([folder, folder.parent])
    except LayoutError as exc:
        raise ExampleError(f"--examples {folder}: {exc}") from None
    if not pairs:
        raise ExampleError(f"--examples {folder}: no image in {folder / IMAGES_DIR} has a mask")
    mask = load_mask(pairs[0][1], max_pixels)
    if mask.max() > 255:
        raise ExampleError(f"--examples {folder}: mask {pairs[0][1].name} holds labels above 255")
    classes = names or [f"class_{i}" for i in range(int(mask[mask != 255].max(initial=0)) + 1)]
    slug = re.sub(r"[^a-z0-9_-]+", "-", folder.name.lower()).strip("-") or "folder"
    return Example(
        id=f"folder-{slug}"[:64],
        title=folder.name,
        classes=classes,
        support=png_bytes(load_rgb(pairs[0][0], max_pixels)),
        mask=mask.astype(np.uint8),
        queries=[png_bytes(load_rgb(p, max_pixels)) for p, _ in pairs[1 : FOLDER_QUERIES + 1]],
    )


def folder_examples(root: Path, max_pixels: int) -> list[Example]:
    """`root` itself when it is a support folder, else each of its sub-folders that is one."""
    if not root.is_dir():
        raise ExampleError(f"--examples {root}: no such folder")
    if (root / IMAGES_DIR).is_dir():
        return [folder_example(root, max_pixels)]
    found = [folder_example(sub, max_pixels) for sub in sorted(root.iterdir()) if (sub / IMAGES_DIR).is_dir()]
    if not found:
        raise ExampleError(f"--examples {root}: neither it nor a sub-folder holds {IMAGES_DIR}/ and masks/")
    return found
