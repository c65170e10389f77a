"""Procedurally generated scenes with exact masks, for smoke runs, the demo and tests.

No dataset can be downloaded here, so every stage trains, evaluates and tests on these:
textured objects of a few classes on a textured background. Each object class has its own
colour family, stripe orientation/frequency and shape, so a dense encoder can tell the classes
apart from local appearance (random-init encoders can, through colour) while NeCo still has
real spatial structure to learn from. numpy only (Pillow only to write PNG files).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from neco.layout import IMAGES_DIR, MASKS_DIR, write_class_names

SCENE_CLASSES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ellipse", "diamond")
"""Class names by label; a dataset with `num_classes=k` uses the first k."""

# Per object class: base RGB colour, stripe angle (radians) and stripe period (pixels, at 224 px).
_CLASS_STYLE: dict[int, tuple[tuple[float, float, float], float, float]] = {
    1: ((0.85, 0.25, 0.20), 0.0, 9.0),
    2: ((0.20, 0.55, 0.85), np.pi / 2, 13.0),
    3: ((0.25, 0.75, 0.30), np.pi / 4, 7.0),
    4: ((0.90, 0.75, 0.15), -np.pi / 4, 11.0),
    5: ((0.65, 0.30, 0.80), np.pi / 3, 16.0),
}


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid: a cheap low-frequency texture in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    ys = np.linspace(0, cells, h)
    xs = np.linspace(0, cells, w)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _shape_mask(label: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Boolean footprint of one object; the shape is tied to the class so masks are learnable."""
    dy, dx = yy - cy, xx - cx
    ry = dy * np.cos(angle) - dx * np.sin(angle)
    rx = dy * np.sin(angle) + dx * np.cos(angle)
    kind = (label - 1) % 5
    if kind == 0:  # disc
        return dy**2 + dx**2 <= r**2
    if kind == 1:  # box
        return (np.abs(ry) <= r * 0.8) & (np.abs(rx) <= r)
    if kind == 2:  # triangle pointing along -ry
        return (ry <= r * 0.6) & (ry >= -r) & (np.abs(rx) <= (ry + r) * 0.6)
    if kind == 3:  # ellipse
        return (ry / (0.55 * r)) ** 2 + (rx / r) ** 2 <= 1.0
    return np.abs(ry) + np.abs(rx) <= r  # diamond


def generate_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (224, 224),
    num_classes: int = 4,
    max_objects: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(image uint8 [H, W, 3], mask uint8 [H, W])`; label 0 is background.

    Objects are painted in order, so later ones occlude earlier ones and the mask always
    records the visible class of every pixel.
    """
    if not 2 <= num_classes <= len(SCENE_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(SCENE_CLASSES)}], got {num_classes}")
    h, w = size
    if h < 8 or w < 8:
        raise ValueError(f"scene size must be at least 8x8, got {size}")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    scale = min(h, w) / 224.0

    bg_colour = 0.35 + 0.3 * rng.random(3)
    bg_tex = 0.6 + 0.4 * _smooth_noise(rng, h, w, cells=int(rng.integers(3, 7)))
    image = bg_tex[..., None] * bg_colour[None, None, :]
    mask = np.zeros((h, w), dtype=np.uint8)

    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(1, num_classes))
        colour, stripe_angle, period = _CLASS_STYLE[label]
        r = min(h, w) * rng.uniform(0.15, 0.3)
        cy, cx = rng.uniform(r * 0.5, h - r * 0.5), rng.uniform(r * 0.5, w - r * 0.5)
        footprint = _shape_mask(label, yy, xx, cy, cx, r, angle=rng.uniform(-0.3, 0.3))
        if not footprint.any():
            continue
        phase = rng.uniform(0, 2 * np.pi)
        coord = yy * np.sin(stripe_angle) + xx * np.cos(stripe_angle)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * coord / (period * scale) + phase)
        tint = np.clip(np.asarray(colour) + rng.normal(0, 0.05, 3), 0, 1)
        texture = (0.65 + 0.35 * stripes)[..., None] * tint[None, None, :]
        image[footprint] = texture[footprint]
        mask[footprint] = label

    image = image + rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def write_scene_dataset(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    size: tuple[int, int] = (224, 224),
    num_classes: int = 4,
    seed: int = 0,
) -> Path:
    """Write `root/<split>/images/NNNN.png`, `root/<split>/masks/NNNN.png`, `root/classes.json`.

    Every split draws from its own seeded stream, so adding a split never changes another.
    """
    from PIL import Image

    splits = {"train": 16, "val": 8} if splits is None else dict(splits)
    root = Path(root)
    for index, (split, count) in enumerate(sorted(splits.items())):
        if count < 0:
            raise ValueError(f"split {split!r} has a negative size {count}")
        rng = np.random.default_rng([seed, index])
        image_dir, mask_dir = root / split / IMAGES_DIR, root / split / MASKS_DIR
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = generate_scene(rng, size=size, num_classes=num_classes)
            Image.fromarray(image).save(image_dir / f"{i:04d}.png")
            Image.fromarray(mask).save(mask_dir / f"{i:04d}.png")
    write_class_names(root, SCENE_CLASSES[:num_classes])
    return root
