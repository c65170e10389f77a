"""Image-guided upsampling of patch-grid scores and features to pixel resolution (numpy only).

A ViT sees one patch per 14 px, so a mask upsampled bilinearly from its (K, h, w) class scores
comes back as rounded blobs that spill over object edges. Joint bilateral upsampling (Kopf et
al., SIGGRAPH 2007) lets the full-resolution image decide where an edge goes: every output
pixel is a normalised weighted mean of the nearby patch values, the weight of a patch being

    spatial(distance from the pixel to the patch centre, in patches)
    x range(colour distance between the pixel and the patch's mean colour).

A pixel on the object's side of an edge has the object's colour, so the patches inside the
object (whose mean colour is the object's) outweigh the background patches next to it, and the
label flips exactly where the colour does. No training, no model: the guide is the image.

Geometry is the one of `neco.client.retrieval.upsample_bilinear` (half-pixel centres: output
pixel o sits at patch coordinate (o + 0.5) * in / out - 0.5), so both methods place a patch at
the same pixels. Work is done in bands of output rows (`GuidedSettings.tile_pixels` pixels at a
time): memory beyond the output itself is bounded, whatever the image size (a 4096-px image
is checked by a test). Values constant over a pixel's neighbourhood come back unchanged, since
the weights are normalised.

The bilinear upsampling of the Hummingbird protocol lives here too (`upsample_bilinear`,
`bilinear_argmax`), and `upsample_features` offers either method, or a learned upsampler (AnyUp,
JAFAR, LoftUp style: low-res features + image -> high-res features) through the `FeatureUpsampler`
protocol; `neco.export.upsampler` exports and runs one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from neco.errors import InputError

UpsampleMethod = Literal["bilinear", "guided"]
UPSAMPLE_METHODS: tuple[UpsampleMethod, ...] = ("bilinear", "guided")
DEFAULT_UPSAMPLE: UpsampleMethod = "guided"
"""`segment()`'s and `neco segment`'s upsampler, chosen from benchmarks/upsampling.py (docs/client.md):
guided keeps edges for a small share of segment()'s time. `segment_features` and the evaluations
default to bilinear, the published protocol's, so their numbers stay comparable."""


class UpsampleError(InputError):
    """An upsampling request that cannot be served: unknown method, missing or mis-sized guide image."""


@runtime_checkable
class FeatureUpsampler(Protocol):
    """Anything that turns (h, w, C) patch features + the (H, W, 3) uint8 image into (H, W, C) features."""

    def __call__(self, features: np.ndarray, image: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class GuidedSettings:
    """Joint bilateral upsampling parameters; the defaults were tuned on benchmarks/upsampling.py."""

    sigma_spatial: float = 0.6
    """Spatial Gaussian, in patches: about one patch, so a pixel still listens to its neighbours."""
    sigma_range: float = 0.2
    """Colour Gaussian, on RGB scaled to [0, 1]: colours 0.5 apart (an edge) weigh ~4% of a match. 0.1 is
    sharper on flat-coloured objects, but lets stripes inside an object (the `textures` scenes) split it."""
    radius: int = 1
    """Patches each side of the nearest one: (2 radius + 1)^2 taps per pixel."""
    tile_pixels: int = 1 << 16
    """Output pixels per band of rows: bounds the working memory to ~tile_pixels x (C + taps) floats."""

    def __post_init__(self) -> None:
        if self.sigma_spatial <= 0 or self.sigma_range <= 0:
            raise UpsampleError("guided upsampling needs sigma_spatial > 0 and sigma_range > 0")
        if self.radius < 1 or self.tile_pixels < 1:
            raise UpsampleError("guided upsampling needs radius >= 1 and tile_pixels >= 1")


DEFAULT_GUIDED = GuidedSettings()


def check_method(method: str) -> UpsampleMethod:
    """`method` if it is one of `UPSAMPLE_METHODS`, else an error naming them."""
    if method not in UPSAMPLE_METHODS:
        raise UpsampleError(f"upsample must be one of {UPSAMPLE_METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def check_guide(guide: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """The guide as (H, W, c), at the output size (its pixels are the output pixels)."""
    if guide is None:
        raise UpsampleError("guided upsampling needs the image (pass guide=, or use upsample='bilinear')")
    guide = np.asarray(guide)
    if guide.ndim == 2:
        guide = guide[..., None]
    if guide.ndim != 3 or guide.shape[:2] != tuple(size):
        raise UpsampleError(f"the guide image must be {size[0]}x{size[1]}(x channels), got shape {guide.shape}")
    return guide


def _axis_taps(size_in: int, size_out: int, radius: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: (size_out, taps) source indices and their spatial Gaussian weights (0 off the grid)."""
    coord = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    nearest = np.clip(np.rint(coord), 0, size_in - 1).astype(np.int64)
    index = nearest[:, None] + np.arange(-radius, radius + 1)[None, :]
    inside = (index >= 0) & (index < size_in)
    weight = np.exp(-((coord[:, None] - index) ** 2) / (2 * sigma**2)) * inside
    return np.clip(index, 0, size_in - 1), weight.astype(np.float32)


def _bin_edges(size_in: int, size_out: int) -> np.ndarray:
    """Start of each of `size_out` equal bins over `size_in` pixels (the pixels a patch covers)."""
    return (np.arange(size_out, dtype=np.int64) * size_in) // size_out


def patch_colours(guide: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h, w, c) float32 mean colour in [0, 1] of the guide pixels each patch covers (area average)."""
    height, width = guide.shape[:2]
    rows, cols = _bin_edges(height, grid[0]), _bin_edges(width, grid[1])
    ends = np.append(rows[1:], height)
    # one patch row at a time: casting the whole image to float64 at once would cost 8 bytes a value
    summed = np.stack(
        [
            np.add.reduceat(guide[top : max(end, top + 1)].sum(axis=0, dtype=np.float64), cols)
            for top, end in zip(rows, ends)
        ]
    )
    row_counts = np.maximum(np.diff(np.append(rows, height)), 1)
    col_counts = np.maximum(np.diff(np.append(cols, width)), 1)
    scale = 255.0 if guide.dtype == np.uint8 else 1.0
    return (summed / (row_counts[:, None, None] * col_counts[None, :, None] * scale)).astype(np.float32)


def _guide_scale(guide: np.ndarray) -> float:
    return 1.0 / 255.0 if guide.dtype == np.uint8 else 1.0


def _row_chunks(nearest: np.ndarray, band: int) -> Iterator[tuple[int, int]]:
    """(first, end) runs of output rows sharing their nearest patch row, cut to at most `band` rows."""
    starts = np.flatnonzero(np.diff(nearest)) + 1
    for first, end in zip(np.r_[0, starts], np.r_[starts, len(nearest)]):
        for top in range(int(first), int(end), band):
            yield top, min(int(end), top + band)


def guided_tiles(
    values: np.ndarray, guide: np.ndarray, settings: GuidedSettings = DEFAULT_GUIDED
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (first row, end row, (rows, W, C) float32) bands of the guided upsampling of (h, w, C) `values`.

    `guide` is the (H, W, c) image at the output size (uint8, or floats in [0, 1]). A band's rows
    share their nearest patch row, hence the patch rows of all their taps, so each tap's values and
    colours are gathered once per band as (W, C) rows and broadcast over the band's rows. Weights are
    computed as a softmax over each pixel's taps (log spatial weight minus scaled colour distance,
    shifted by the per-pixel maximum): equal to the normalised product of the two kernels, and the
    best tap always weighs 1, so the weights never all underflow to zero.
    """
    h, w, channels = values.shape
    height, width = guide.shape[:2]
    values = np.ascontiguousarray(values, dtype=np.float32)
    colours = patch_colours(guide, (h, w))
    row_index, row_weight = _axis_taps(h, height, settings.radius, settings.sigma_spatial)
    col_index, col_weight = _axis_taps(w, width, settings.radius, settings.sigma_spatial)
    with np.errstate(divide="ignore"):  # taps off the grid weigh 0: log -inf
        row_log, col_log = np.log(row_weight), np.log(col_weight)
    taps = [(a, b) for a in range(row_index.shape[1]) for b in range(col_index.shape[1])]
    scale, inv_two_var = np.float32(_guide_scale(guide)), np.float32(1.0 / (2 * settings.sigma_range**2))
    for top, bottom in _row_chunks(row_index[:, settings.radius], max(1, settings.tile_pixels // width)):
        pixels = guide[top:bottom].astype(np.float32) * scale  # (T, W, c)
        logits = np.empty((len(taps), bottom - top, width), dtype=np.float32)
        for t, (a, b) in enumerate(taps):
            colour = colours[row_index[top, a], col_index[:, b]]  # (W, c)
            # -|p - q|^2 / 2s^2 without the pixel's own |p|^2, a per-pixel constant the max below removes
            np.einsum("ijc,jc->ij", pixels, colour * (2 * inv_two_var), out=logits[t])
            logits[t] += (col_log[:, b] - inv_two_var * np.einsum("jc,jc->j", colour, colour))[None, :]
            logits[t] += row_log[top:bottom, a, None]
        logits -= logits.max(axis=0)
        weights = np.exp(logits, out=logits)  # (taps, T, W), reusing the buffer
        out = np.zeros((bottom - top, width, channels), dtype=np.float32)
        for t, (a, b) in enumerate(taps):
            out += weights[t][..., None] * values[row_index[top, a], col_index[:, b]]  # (T, W, 1) * (W, C)
        out /= weights.sum(axis=0)[..., None]
        yield top, bottom, out


def upsample_guided(
    values: np.ndarray,
    guide: np.ndarray,
    *,
    settings: GuidedSettings = DEFAULT_GUIDED,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Joint bilateral upsampling of (h, w, C) `values` to the guide's (H, W): returns (H, W, C) float32.

    `out` may be a preallocated (H, W, C) array, e.g. a `np.memmap` for pixel-resolution
    features of a large image that would not fit in memory.
    """
    if values.ndim != 3:
        raise UpsampleError(f"values to upsample must be (h, w, C), got shape {values.shape}")
    guide = check_guide(guide, guide.shape[:2])
    shape = (*guide.shape[:2], values.shape[2])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape:
        raise UpsampleError(f"out must have shape {shape}, got {out.shape}")
    for top, bottom, band in guided_tiles(values, guide, settings):
        out[top:bottom] = band
    return out


def guided_argmax(
    grid: np.ndarray, guide: np.ndarray, keep_scores: bool, settings: GuidedSettings = DEFAULT_GUIDED
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels, confidence and optionally (K, H, W) scores of the guided upsampling of (K, h, w) scores.

    The counterpart of `bilinear_argmax`: band by band, so only the (H, W) label
    and confidence maps (and the scores, when asked for) are ever whole.
    """
    num_classes = grid.shape[0]
    height, width = guide.shape[:2]
    label = np.empty((height, width), dtype=np.uint8 if num_classes <= 256 else np.uint16)
    confidence = np.empty((height, width), dtype=np.float32)
    scores = np.empty((num_classes, height, width), dtype=np.float32) if keep_scores else None
    for top, bottom, band in guided_tiles(np.moveaxis(grid, 0, -1), guide, settings):
        label[top:bottom] = band.argmax(axis=-1)
        confidence[top:bottom] = band.max(axis=-1)
        if scores is not None:
            scores[:, top:bottom] = np.moveaxis(band, -1, 0)
    return label, confidence, scores


def interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) linear-resampling weights, half-pixel centres, edges clamped.

    Each row holds at most two non-zero weights summing to 1; resampling is then one matrix
    product, which BLAS does far faster than gathering and blending pixels.
    """
    coord = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    coord = np.clip(coord, 0.0, size_in - 1)
    low = np.floor(coord).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    frac = coord - low
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def upsample_bilinear(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize (K, h, w) scores to (K, H, W) (separable: rows @ scores @ cols^T)."""
    rows = interpolation_matrix(scores.shape[1], size[0])
    cols = interpolation_matrix(scores.shape[2], size[1])
    return rows @ scores.astype(np.float32, copy=False) @ cols.T


def upsample_features(
    features: np.ndarray,
    image: np.ndarray,
    method: UpsampleMethod | FeatureUpsampler = "guided",
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(h, w, C) patch features -> (H, W, C) features at the size of `image` (H, W, 3).

    `method`: "guided" (joint bilateral, tiled; `out` may be a `np.memmap` for large images),
    "bilinear", or a learned `FeatureUpsampler` such as `neco.export.upsampler.OnnxUpsampler`.
    Upsampled vectors are weighted means, so they are no longer unit-norm: renormalise before
    cosine similarity if needed.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (h, w, C), got shape {features.shape}")
    if isinstance(method, FeatureUpsampler):
        return np.asarray(method(features, np.asarray(image)), dtype=np.float32)
    guide = check_guide(image, np.asarray(image).shape[:2])
    if check_method(method) == "guided":
        return upsample_guided(features, guide, out=out)
    resized = np.moveaxis(upsample_bilinear(np.moveaxis(features, -1, 0), guide.shape[:2]), 0, -1)
    if out is None:
        return resized
    out[...] = resized
    return out


def bilinear_argmax(
    grid: np.ndarray, size: tuple[int, int], keep_scores: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """argmax and max over classes of the upsampled scores, one class plane at a time.

    Equal to `upsample_bilinear(grid, size).argmax(0)` / `.max(0)` (first class wins ties) but
    never materialises (K, H, W) unless scores are wanted, and skips classes that provably
    cannot win anywhere: an interpolated score never exceeds the class's largest patch score,
    while at every pixel the best class scores at least (smallest patch total) / K, because
    interpolation weights are convex and each patch's scores sum to its total.
    """
    grid = np.ascontiguousarray(grid, dtype=np.float32)  # strided planes make every matmul slow
    num_classes = grid.shape[0]
    rows = interpolation_matrix(grid.shape[1], size[0])
    across = grid @ interpolation_matrix(grid.shape[2], size[1]).T  # (K, h, W)
    floor = float(grid.sum(axis=0).min()) / num_classes
    candidates = [c for c in range(num_classes) if keep_scores or grid[c].max() >= floor] or [0]
    scores = np.empty((num_classes, *size), dtype=np.float32) if keep_scores else None
    best = np.full(size, -np.inf, dtype=np.float32)
    label = np.zeros(size, dtype=np.uint8 if num_classes <= 256 else np.uint16)
    plane, better = np.empty(size, dtype=np.float32), np.empty(size, dtype=bool)  # reused buffers
    for c in candidates:
        np.matmul(rows, across[c], out=plane if scores is None else scores[c])
        current = plane if scores is None else scores[c]
        np.greater(current, best, out=better)
        np.copyto(label, c, where=better)
        np.maximum(best, current, out=best)
    return label, best, scores
