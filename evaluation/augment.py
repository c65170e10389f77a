"""Square-resized (image, mask) views for the published protocols, with the memory augmentation.

open-hummingbird-eval resizes every image to input_size x input_size with torch's bilinear
antialiased interpolation and its mask with torch's `nearest` (source index floor(i * in / out)),
both reproduced here in numpy (`resize_bilinear_aa`, `resize_nearest_floor`) so the published
protocol sees the reference's pixels without torch on the client-backend path; the strict protocol
keeps the client's own rules (bicubic, half-pixel nearest). Overclustering's masks follow PIL's
`NEAREST` (`resize_nearest_centre`), as the NeCo repository resizes them.

It augments EVERY memory pass, the first included: a random-resized crop shared by image and mask
(area scale 0.5-2.0 of the image, aspect 3/4-4/3, torchvision's sampling with its centre fallback
when no crop fits) and colour jitter 0.1 in brightness, contrast, saturation and hue, each applied
with probability 0.5. Views are seeded per (seed, pass, index), so a run is
reproducible and independent of batching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

CROP_SCALE: tuple[float, float] = (0.5, 2.0)
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)
JITTER: float = 0.1
JITTER_P: float = 0.5

MaskResize = Callable[[np.ndarray, tuple[int, int]], np.ndarray]
"""A label-mask resize rule: (mask, (height, width)) -> mask, never blending labels."""


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) sampled like torchvision's RandomResizedCrop."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _grey(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114])


def colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation, hue jitter (factors 1 +- 0.1, hue +- 0.1), each p=0.5."""
    x = image.astype(np.float64)
    if rng.random() < JITTER_P:
        x = x * rng.uniform(1 - JITTER, 1 + JITTER)
    if rng.random() < JITTER_P:
        mean = _grey(np.clip(x, 0, 255)).mean()
        x = (x - mean) * rng.uniform(1 - JITTER, 1 + JITTER) + mean
    if rng.random() < JITTER_P:
        grey = _grey(np.clip(x, 0, 255))[..., None]
        x = (x - grey) * rng.uniform(1 - JITTER, 1 + JITTER) + grey
    out = np.clip(x, 0, 255).round().astype(np.uint8)
    if rng.random() < JITTER_P:
        hsv = np.asarray(Image.fromarray(out).convert("HSV")).copy()
        shift = round(rng.uniform(-JITTER, JITTER) * 255)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
        out = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    return out


def nearest_floor_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel as torch's `interpolate(mode="nearest")` picks it.

    torch computes floor(i * scale) with scale = in / out in float32 (exact shortcuts for the
    same size and for doubling); float32 matters where i * in / out is an integer.
    """
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def nearest_centre_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel as PIL's `resize(NEAREST)` (torchvision's on PIL images) picks it.

    PIL walks pixel centres, 0.5 * in / out then + in / out per pixel, adding in float64 and
    flooring; the running sum (not (i + 0.5) * in / out) is what matches it on every size.
    """
    step = in_size / out_size
    centres = np.add.accumulate(np.concatenate([[0.5 * step], np.full(out_size - 1, step)]))
    return np.minimum(np.floor(centres).astype(np.int64), in_size - 1)


def resize_nearest_floor(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label mask resized to (height, width) like torch's `nearest`: no label is blended."""
    rows, cols = nearest_floor_index(mask.shape[0], size[0]), nearest_floor_index(mask.shape[1], size[1])
    return mask[rows[:, None], cols[None, :]]


def resize_nearest_centre(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label mask resized to (height, width) like PIL's `NEAREST` (the NeCo overclustering masks)."""
    rows, cols = nearest_centre_index(mask.shape[0], size[0]), nearest_centre_index(mask.shape[1], size[1])
    return mask[rows[:, None], cols[None, :]]


def bilinear_aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's `interpolate(mode="bilinear", antialias=True, align_corners=False)`.

    A triangle filter centred at scale * (i + 0.5), widened by the scale when shrinking (so every
    input pixel contributes, as in PIL), taps in [trunc(c - support + 0.5), trunc(c + support + 0.5)),
    normalised to sum 1.
    """
    scale = in_size / out_size
    support, invscale = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    centre = scale * (np.arange(out_size) + 0.5)
    first = np.maximum(np.trunc(centre - support + 0.5), 0)[:, None]
    stop = np.minimum(np.trunc(centre + support + 0.5), in_size)[:, None]
    taps = np.arange(in_size)[None, :]
    weights = np.clip(1 - np.abs((taps - centre[:, None] + 0.5) * invscale), 0, None)
    weights = np.where((taps >= first) & (taps < stop), weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return weights / np.where(total == 0, 1, total)


def resize_bilinear_aa(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 [H, W, 3] image resized like the reference (torch bilinear + antialias on floats), rounded."""
    rows = bilinear_aa_weights(image.shape[0], size[0]).astype(np.float32)
    cols = bilinear_aa_weights(image.shape[1], size[1]).astype(np.float32)
    height, width, channels = image.shape
    # Two plain 2-D products (rows, then columns with the channels moved ahead): BLAS-speed.
    resized = rows @ image.reshape(height, width * channels).astype(np.float32)
    resized = np.ascontiguousarray(resized.reshape(size[0], width, channels).transpose(0, 2, 1))
    resized = (resized.reshape(size[0] * channels, width) @ cols.T).reshape(size[0], channels, size[1])
    resized = resized.transpose(0, 2, 1)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def square(
    image: np.ndarray, mask: np.ndarray, size: int, mask_resize: MaskResize = resize_nearest_floor
) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear + antialias) and mask (torch nearest unless told) resized to size x size."""
    return resize_bilinear_aa(image, (size, size)), mask_resize(mask, (size, size))


def hbird_memory_view(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented memory view: shared random-resized crop, square resize, colour jitter."""
    top, left, h, w = crop_box(*mask.shape, rng)
    image, mask = square(image[top : top + h, left : left + w], mask[top : top + h, left : left + w], size)
    return colour_jitter(image, rng), mask


class SquareViews(Sequence[tuple[np.ndarray, np.ndarray]]):
    """(image, mask) pairs resized to size x size; `augment_pass` set = memory views of that pass."""

    def __init__(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        size: int,
        *,
        augment_pass: int | None = None,
        seed: int = 0,
        mask_resize: MaskResize = resize_nearest_floor,
    ) -> None:
        self.pairs = pairs
        self.size = size
        self.mask_resize = mask_resize
        self.augment_pass = augment_pass
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        image, mask = self.pairs[index]
        if self.augment_pass is None:
            return square(image, mask, self.size, self.mask_resize)
        rng = np.random.default_rng([self.seed, self.augment_pass, index])
        return hbird_memory_view(image, mask, self.size, rng)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))
