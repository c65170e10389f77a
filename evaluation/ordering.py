"""Ordering agreement: the quantity NeCo optimises, measured on held-out images.

NeCo trains a patch's *ordering* of similarities to a set of reference patches to be the same
in two augmented views of an image. This module measures exactly that, without training code:

1. a fixed reference set: `num_references` patch features drawn (seeded) from reference images,
   computed by the model under test;
2. per held-out image, two views: seeded random crops that overlap, each with its own colour
   jitter (brightness, contrast, saturation), resized to `size` x `size`;
3. a `grid` x `grid` lattice of points inside the crops' intersection, each point's feature
   bilinearly sampled from both views' patch maps (the two views see the same image content);
4. per point, the Spearman correlation between the two views' similarity ranks to the
   references; the result is the mean over points and images (1 = identical orderings).

numpy + Pillow only, through any `FeatureBackend`, so it scores a served model as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from neco.errors import NecoError

Box = tuple[float, float, float, float]
"""(top, left, height, width) in image pixels."""


class OrderingError(NecoError, ValueError):
    """Bad arguments to the ordering-agreement metric."""


@dataclass(frozen=True)
class OrderingResult:
    mean_spearman: float
    std_spearman: float
    points: int
    images: int
    num_references: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def rank_rows(values: np.ndarray) -> np.ndarray:
    """0-based ranks along the last axis (similarities are continuous, so ties are not averaged)."""
    ranks = np.empty_like(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(values.shape[-1], dtype=np.float64)[None, :], axis=-1)
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row of `a` (N, R) with the same row of `b`."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise OrderingError(f"need two (N, R>=2) arrays of one shape, got {a.shape} and {b.shape}")
    ra, rb = rank_rows(a), rank_rows(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))


def sample_features(fmap: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (h, w, C) patch map at (N, 2) points in patch units (y, x).

    Patch (i, j) sits at (i + 0.5, j + 0.5); points outside the centres are clamped to the edge.
    """
    h, w = fmap.shape[:2]
    y = np.clip(points[:, 0] - 0.5, 0, h - 1)
    x = np.clip(points[:, 1] - 0.5, 0, w - 1)
    y0, x0 = np.minimum(y.astype(int), h - 1), np.minimum(x.astype(int), w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[:, None]
    top = fmap[y0, x0] * (1 - fx) + fmap[y0, x1] * fx
    bottom = fmap[y1, x0] * (1 - fx) + fmap[y1, x1] * fx
    out = top * (1 - fy) + bottom * fy
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def intersection_points(a: Box, b: Box, grid: int) -> np.ndarray:
    """(grid*grid, 2) cell centres (y, x, image pixels) of the intersection of two boxes."""
    top, left = max(a[0], b[0]), max(a[1], b[1])
    bottom, right = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    if bottom <= top or right <= left:
        raise OrderingError(f"boxes {a} and {b} do not overlap")
    ys = top + (np.arange(grid) + 0.5) * (bottom - top) / grid
    xs = left + (np.arange(grid) + 0.5) * (right - left) / grid
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def to_view(points: np.ndarray, box: Box, size: int, patch: int) -> np.ndarray:
    """Image-pixel points -> patch units of a `box` crop resized to size x size."""
    return np.stack([(points[:, 0] - box[0]) * size / box[2], (points[:, 1] - box[1]) * size / box[3]], 1) / patch


def _overlapping_boxes(h: int, w: int, rng: np.random.Generator, min_scale: float) -> tuple[Box, Box]:
    """Two square-ish crops of side >= min_scale * side whose intersection is at least a quarter of each."""
    while True:
        boxes = []
        for _ in range(2):
            ch, cw = h * rng.uniform(min_scale, 1.0), w * rng.uniform(min_scale, 1.0)
            boxes.append((rng.uniform(0, h - ch), rng.uniform(0, w - cw), ch, cw))
        a, b = boxes
        ih = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
        iw = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
        if ih > 0 and iw > 0 and ih * iw >= 0.25 * max(a[2] * a[3], b[2] * b[3]):
            return a, b


def jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors in 1 +- strength (NeCo's crops jitter colour too)."""
    x = image.astype(np.float64) * rng.uniform(1 - strength, 1 + strength)
    grey = x @ np.array([0.299, 0.587, 0.114])
    x = (x - grey.mean()) * rng.uniform(1 - strength, 1 + strength) + grey.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    x = (x - grey) * rng.uniform(1 - strength, 1 + strength) + grey
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _view(image: np.ndarray, box: Box, size: int) -> np.ndarray:
    top, left, h, w = box
    crop = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return np.asarray(crop)


def feature_maps(backend, images: Sequence[np.ndarray]) -> np.ndarray:
    """(B, h, w, C) features of equal-size views; a backend may answer with an array or a list of maps."""
    return np.stack([np.asarray(m, dtype=np.float32) for m in backend.features(np.stack(images))])


def reference_features(backend, images: Sequence[np.ndarray], size: int, num_references: int, seed: int) -> np.ndarray:
    """(num_references, C) patch features drawn without replacement from the images' patch maps."""
    maps = feature_maps(backend, [_view(im, (0, 0, *im.shape[:2]), size) for im in images])
    flat = maps.reshape(-1, maps.shape[-1])
    if num_references > len(flat):
        raise OrderingError(f"num_references={num_references} but the reference images have {len(flat)} patches")
    return flat[np.random.default_rng(seed).choice(len(flat), num_references, replace=False)]


def ordering_agreement(
    backend,
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    size: int,
    num_references: int = 64,
    grid: int = 4,
    min_scale: float = 0.5,
    jitter_strength: float = 0.4,
    seed: int = 0,
) -> OrderingResult:
    """Mean Spearman agreement of aligned patches' reference orderings between two views.

    Every random draw is seeded per image, so two models are scored on identical views.
    """
    patch = backend.contract.patch_size
    if not images or not references:
        raise OrderingError("ordering_agreement needs held-out images and reference images")
    if size % patch or grid < 1 or not 0 < min_scale <= 1:
        raise OrderingError(f"bad size={size} (multiple of {patch}), grid={grid} or min_scale={min_scale}")
    refs = reference_features(backend, references, size, num_references, seed)
    scores = []
    for index, image in enumerate(images):
        rng = np.random.default_rng([seed, index])
        boxes = _overlapping_boxes(*image.shape[:2], rng, min_scale)
        views = [jitter(_view(image, box, size), rng, jitter_strength) for box in boxes]
        maps = feature_maps(backend, views)
        points = intersection_points(*boxes, grid)
        sims = [sample_features(m, to_view(points, box, size, patch)) @ refs.T for m, box in zip(maps, boxes)]
        scores.append(spearman_rows(*sims))
    values = np.concatenate(scores)
    return OrderingResult(float(values.mean()), float(values.std()), len(values), len(images), num_references)
