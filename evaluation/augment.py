"""Square-resized (image, mask) views for the published protocols, with the memory augmentation.

open-hummingbird-eval resizes every image to input_size x input_size and its mask the same way
(nearest), and augments EVERY memory pass, the first included: a random-resized crop shared by
image and mask (area scale 0.5-2.0 of the image, aspect 3/4-4/3, torchvision's sampling with its
centre fallback when no crop fits) and colour jitter 0.1 in brightness, contrast, saturation and
hue, each applied with probability 0.5. Views are seeded per (seed, pass, index), so a run is
reproducible and independent of batching.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from neco.client import resize_mask

CROP_SCALE: tuple[float, float] = (0.5, 2.0)
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)
JITTER: float = 0.1
JITTER_P: float = 0.5


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


def square(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (bicubic) and mask (nearest) resized to size x size."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    return resized, resize_mask(mask, (size, size))


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
    ) -> None:
        self.pairs = pairs
        self.size = size
        self.augment_pass = augment_pass
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        image, mask = self.pairs[index]
        if self.augment_pass is None:
            return square(image, mask, self.size)
        rng = np.random.default_rng([self.seed, self.augment_pass, index])
        return hbird_memory_view(image, mask, self.size, rng)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))
