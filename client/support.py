"""Support sets: reading (image, mask) pairs, per-patch soft labels, rare-class patch sampling.

A support set is any of: a sequence of (image, mask) pairs, a folder holding `images/` and
`masks/` (matched by file stem, optional `classes.json` in the folder or its parent, which is
the layout `neco.scenes.write_scene_dataset` writes), or any iterable/dataset yielding
(image, mask) pairs (an optional `class_names` attribute is honoured).

Sharding: `shard=(i, n)` keeps the items whose index is i modulo n (interleaved, so shards of a
sorted folder get similar content and sizes). Items keep their index in the whole set, which
seeds their patch sampling and becomes the bank's image id, so n shard banks merged by
`MemoryBank.merge` equal the bank one process builds from the whole set.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neco.client.bank_manifest import DEFAULT_IMAGE_SIZE
from neco.client.errors import SupportSetError
from neco.client.images import ImageLike, SizeSpec
from neco.contract import IGNORE_INDEX
from neco.layout import find_class_names, image_mask_pairs


@dataclass(frozen=True)
class SupportSet:
    """A normalised view of a support set: its items, their count (if known), class names."""

    items: Iterable[tuple[ImageLike, ImageLike]]
    length: int | None
    """Items in the whole set (all shards): per-image budgets are shares of it."""
    class_names: list[str] | None
    source: str
    shard: tuple[int, int] = (0, 1)
    """(i, n): this view yields the items with index % n == i."""


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` (0 <= i < n) as a tuple, with a clear error otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SupportSetError(f"a shard is written i/n (e.g. 0/3), got {text!r}") from None
    return check_shard((index, count))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise SupportSetError(f"shard {index}/{count} is invalid: need 0 <= i < n")
    return index, count


def open_support(support: Any, class_names: Sequence[str] | None = None, shard: tuple[int, int] = (0, 1)) -> SupportSet:
    """Normalise any accepted support-set form; explicit `class_names` win over discovered ones."""
    names = list(class_names) if class_names is not None else None
    shard = check_shard(shard)
    if isinstance(support, (str, Path)):
        folder = Path(support)
        if not folder.is_dir():
            raise SupportSetError(f"support folder {str(folder)!r} does not exist")
        pairs = image_mask_pairs(folder, SupportSetError)
        found = names or find_class_names([folder, folder.parent], SupportSetError)
        return SupportSet(pairs, len(pairs), found, f"folder {str(folder)!r}", shard)
    if not isinstance(support, Iterable):
        raise SupportSetError(f"a support set must be (image, mask) pairs or a folder, not {type(support).__name__}")
    if names is None:
        found = getattr(support, "class_names", None)
        names = list(found) if found is not None else None
    length = len(support) if hasattr(support, "__len__") else None
    return SupportSet(support, length, names, type(support).__name__, shard)


def shard_length(support: SupportSet) -> int | None:
    """How many items this shard yields (None when the whole set's length is unknown)."""
    if support.length is None:
        return None
    index, count = support.shard
    return len(range(index, support.length, count))


def iter_pairs(support: SupportSet) -> Iterator[tuple[int, ImageLike, ImageLike]]:
    """Yield (index in the whole set, image, mask) of this shard, failing clearly on non-pairs."""
    shard, shards = support.shard
    for index, item in enumerate(support.items):
        if index % shards != shard:
            continue
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise SupportSetError(f"support item {index} of {support.source} is not an (image, mask) pair")
        yield index, item[0], item[1]


def patch_soft_labels(
    mask: np.ndarray, patch_size: int, num_classes: int | None, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch class frequencies of a mask whose sides are patch multiples.

    Returns (soft (P, K) float32 whose rows sum to 1, keep (P,) bool) for the P = h*w patches in
    row-major order; ignore pixels (255) do not count, and patches made only of them are marked
    `keep=False` because they carry no label to transfer. `num_classes=None` sizes K by the
    mask's largest label.
    """
    height, width = mask.shape
    rows, cols = height // patch_size, width // patch_size
    valid = mask != IGNORE_INDEX
    labels = mask[valid]
    top = int(labels.max()) if labels.size else -1
    if num_classes is not None and top >= num_classes:
        bad = sorted({int(v) for v in np.unique(labels) if v >= num_classes})
        raise SupportSetError(
            f"mask of {name} holds labels {bad[:10]} beyond the {num_classes} known classes "
            f"(valid labels are 0..{num_classes - 1} and {IGNORE_INDEX} = ignore)"
        )
    k = num_classes if num_classes is not None else top + 1
    patch_id = np.arange(rows)[:, None, None, None] * cols + np.arange(cols)[None, None, :, None]
    patch_id = np.broadcast_to(patch_id, (rows, patch_size, cols, patch_size)).reshape(height, width)
    counts = np.bincount(patch_id[valid] * max(k, 1) + labels, minlength=rows * cols * max(k, 1))
    counts = counts.reshape(rows * cols, max(k, 1)).astype(np.float32)[:, :k]
    totals = counts.sum(axis=1)
    keep = totals > 0
    soft = np.zeros_like(counts)
    soft[keep] = counts[keep] / totals[keep, None]
    return soft, keep


def sample_rare_first(soft: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Pick `budget` patch indices without replacement, favouring patches of rare classes.

    Like Hummingbird's bounded memory, each image contributes a fixed number of patches and
    a patch's chance grows as the image-level frequency of its classes falls, so small objects
    survive the subsampling. Concretely: weight_p = 1 / sum_c soft[p, c] * freq[c], with freq
    the class frequencies over the image's labelled patches, sampled by Efraimidis-Spirakis
    keys log(u) / weight (largest keys win).
    """
    count = soft.shape[0]
    if budget >= count:
        return np.arange(count)
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    freq = soft.sum(axis=0) / max(count, 1)
    weight = 1.0 / np.maximum(soft @ freq, 1e-12)
    keys = np.log(rng.random(count).clip(1e-300)) / weight
    chosen = np.argpartition(-keys, budget - 1)[:budget]
    return np.sort(chosen)


def support_size(support: Any) -> SizeSpec:
    """The size policy of a support set given without one: its first image's shorter side, at most 448.

    Small images are not upsampled (112-px scenes at 448 cost 16x the patches and match a query
    worse), large ones are shrunk to the default. A one-pass iterable cannot be peeked at without
    losing its first item, so it gets the default; so does an image whose header cannot be read
    (building the bank then names it).
    """
    first: Any = None
    if isinstance(support, (str, Path)) and Path(support).is_dir():
        pairs = image_mask_pairs(Path(support), SupportSetError)
        first = pairs[0][0] if pairs else None
    elif isinstance(support, Sequence) and len(support) > 0 and isinstance(support[0], (tuple, list)):
        first = support[0][0]
    side = _shorter_side(first) if first is not None else None
    return DEFAULT_IMAGE_SIZE if side is None else min(side, DEFAULT_IMAGE_SIZE)


def _shorter_side(image: Any) -> int | None:
    """The shorter side of an image from its header (never decoded), or None when it cannot be read."""
    if isinstance(image, np.ndarray):
        return int(min(image.shape[:2])) if image.ndim >= 2 and min(image.shape[:2]) > 0 else None
    if isinstance(image, Image.Image):
        return min(image.size) or None
    try:
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
        with Image.open(source) as opened:
            return min(opened.size) or None
    except (OSError, ValueError, TypeError, AttributeError, Image.DecompressionBombError):
        return None
