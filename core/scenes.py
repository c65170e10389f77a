"""Procedurally generated scenes with exact masks, for smoke runs, the demo and tests.

No dataset can be downloaded here, so every stage trains, evaluates and tests on these:
textured objects of a few classes on a textured background. Each object class has its own
colour family, stripe orientation/frequency and shape, so a dense encoder can tell the classes
apart from local appearance (random-init encoders can, through colour) while NeCo still has
real spatial structure to learn from. numpy only (Pillow only to write PNG files).

Two families (`family=`):

- "shapes" (the original): colour, stripes and shape all follow the class, so colour alone
  separates the classes and a random-init encoder already segments them well.
- "textures": the class is a texture pattern (horizontal / vertical / diagonal stripes, dots,
  checker; the background is soft blotches) plus the class's shape, while colour and brightness
  are drawn per object and per background independently of the class. Only texture, shape and
  context separate the classes, so dense features have to be learned: the benchmark that shows
  whether NeCo helps (benchmarks/neco_effect.py, the demo).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neco.layout import IMAGES_DIR, MASKS_DIR, write_class_names

SCENE_CLASSES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ellipse", "diamond")
"""Class names by label; a dataset with `num_classes=k` uses the first k."""

TEXTURE_CLASSES: tuple[str, ...] = ("background", "stripes_h", "stripes_v", "dots", "checker", "stripes_diag")
"""Class names of the "textures" family (same labels, same shapes per label)."""

SCENE_FAMILIES: dict[str, tuple[str, ...]] = {"shapes": SCENE_CLASSES, "textures": TEXTURE_CLASSES}
"""Family name -> class names by label."""

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


# "textures" family, per object class: the pattern and its period (pixels, at 224 px).
_TEXTURE_STYLE: dict[int, tuple[str, float]] = {
    1: ("stripes_h", 12.0),
    2: ("stripes_v", 12.0),
    3: ("dots", 14.0),
    4: ("checker", 14.0),
    5: ("stripes_diag", 12.0),
}
_STRIPE_ANGLE = {"stripes_h": np.pi / 2, "stripes_v": 0.0, "stripes_diag": np.pi / 4}


def _pattern(kind: str, yy: np.ndarray, xx: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Texture in [0, 1] with a random phase and a small random tilt; the class is the pattern."""
    tilt = rng.uniform(-0.15, 0.15)
    oy, ox = rng.uniform(0, period, 2)
    if kind in _STRIPE_ANGLE:
        angle = _STRIPE_ANGLE[kind] + tilt
        coord = yy * np.sin(angle) + xx * np.cos(angle)
        return 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi))
    u = (yy + oy) * np.cos(tilt) - (xx + ox) * np.sin(tilt)
    v = (yy + oy) * np.sin(tilt) + (xx + ox) * np.cos(tilt)
    if kind == "checker":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float64)
    du, dv = (u % period) - period / 2, (v % period) - period / 2  # dots: a disc per cell
    return (du**2 + dv**2 <= (0.3 * period) ** 2).astype(np.float64)


def _random_palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(light, dark) colours of one region: random hue and brightness, the same draw for every class."""
    light = (0.25 + 0.75 * rng.random(3)) * rng.uniform(0.55, 1.0)
    return light, light * rng.uniform(0.2, 0.5)


@dataclass(frozen=True)
class SceneObject:
    """Geometry of one painted object: its class's shape centred at (cy, cx), size r, turned by angle."""

    label: int
    cy: float
    cx: float
    r: float
    angle: float


def texture_scene(
    rng: np.random.Generator, size: tuple[int, int], num_classes: int = 4, max_objects: int = 3
) -> tuple[np.ndarray, np.ndarray, list[SceneObject]]:
    """A "textures" scene and the geometry of its objects in painting order (for exactness checks)."""
    objects: list[SceneObject] = []
    image, mask = _texture_scene(rng, *size, num_classes, max_objects, objects)
    return image, mask, objects


def _texture_scene(
    rng: np.random.Generator, h: int, w: int, num_classes: int, max_objects: int, objects: list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The "textures" family; colour never depends on the label, the pattern and shape do."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    scale = min(h, w) / 224.0
    light, dark = _random_palette(rng)
    blotches = _smooth_noise(rng, h, w, cells=int(rng.integers(3, 7)))[..., None]
    image = dark + (light - dark) * blotches
    mask = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(1, num_classes))
        kind, period = _TEXTURE_STYLE[label]
        r = min(h, w) * rng.uniform(0.18, 0.32)
        cy, cx = rng.uniform(r * 0.5, h - r * 0.5), rng.uniform(r * 0.5, w - r * 0.5)
        angle = rng.uniform(-0.3, 0.3)
        footprint = _shape_mask(label, yy, xx, cy, cx, r, angle)
        if not footprint.any():
            continue
        if objects is not None:
            objects.append(SceneObject(label, cy, cx, r, angle))
        light, dark = _random_palette(rng)
        texture = dark + (light - dark) * _pattern(kind, yy, xx, period * scale, rng)[..., None]
        image[footprint] = texture[footprint]
        mask[footprint] = label
    image = image + rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def generate_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (224, 224),
    num_classes: int = 4,
    max_objects: int = 3,
    family: str = "shapes",
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(image uint8 [H, W, 3], mask uint8 [H, W])`; label 0 is background.

    Objects are painted in order, so later ones occlude earlier ones and the mask always
    records the visible class of every pixel. `family` is a key of `SCENE_FAMILIES`.
    """
    if family not in SCENE_FAMILIES:
        raise ValueError(f"unknown scene family {family!r}; choose one of {sorted(SCENE_FAMILIES)}")
    if not 2 <= num_classes <= len(SCENE_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(SCENE_CLASSES)}], got {num_classes}")
    h, w = size
    if h < 8 or w < 8:
        raise ValueError(f"scene size must be at least 8x8, got {size}")
    if family == "textures":
        return _texture_scene(rng, h, w, num_classes, max_objects)
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
    family: str = "shapes",
) -> Path:
    """Write `root/<split>/images/NNNN.png`, `root/<split>/masks/NNNN.png`, `root/classes.json`.

    Every split draws from its own seeded stream, so adding a split never changes another.
    `family` is a key of `SCENE_FAMILIES` (checked before anything is written).
    """
    from PIL import Image

    if family not in SCENE_FAMILIES:
        raise ValueError(f"unknown scene family {family!r}; choose one of {sorted(SCENE_FAMILIES)}")
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
            image, mask = generate_scene(rng, size=size, num_classes=num_classes, family=family)
            Image.fromarray(image).save(image_dir / f"{i:04d}.png")
            Image.fromarray(mask).save(mask_dir / f"{i:04d}.png")
    write_class_names(root, SCENE_FAMILIES[family][:num_classes])
    return root
