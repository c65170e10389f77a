"""Pictures of results: label colour palette, mask overlays with a legend, PCA->RGB features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neco.client.images import ImageLike, load_rgb
from neco.contract import IGNORE_INDEX

LEGEND_FONT_PX = 15
"""Legend text height: readable on a screen without zooming (Pillow's scalable default font)."""


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, Pascal-VOC style: bits of the index spread over R, G, B.

    Distinct, deterministic colours for any number of classes, and the same colours VOC
    annotation tools use, so overlays are comparable with published figures.
    """
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for label in range(num_classes):
        value, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[label] = (r, g, b)
    return colours[:num_classes]


def mask_to_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """A palette PNG-ready image whose pixel values are the labels (viewable in colour)."""
    if mask.max(initial=0) > 255:
        return Image.fromarray(mask.astype(np.uint16))
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: min(num_classes, 256)] = palette(min(num_classes, 256))
    flat[IGNORE_INDEX] = (255, 255, 255)
    image.putpalette(flat.reshape(-1).tolist())
    return image


def overlay(
    image: ImageLike,
    mask: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    legend: bool = True,
) -> Image.Image:
    """Blend class colours over the image and add a legend strip for the classes present."""
    rgb = load_rgb(image)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(
            f"overlay: image is {rgb.shape[0]}x{rgb.shape[1]} but the mask is {mask.shape[0]}x{mask.shape[1]}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    colours = palette(len(class_names)).astype(np.float32)
    valid = mask < len(class_names)
    blended = rgb.astype(np.float32)
    blended[valid] = (1 - alpha) * blended[valid] + alpha * colours[mask[valid]]
    picture = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    if not legend:
        return picture
    present = [int(c) for c in np.unique(mask[valid])]
    return _add_legend(picture, [(class_names[c], tuple(int(v) for v in colours[c])) for c in present])


def _add_legend(picture: Image.Image, entries: list[tuple[str, tuple[int, ...]]]) -> Image.Image:
    font = ImageFont.load_default(size=LEGEND_FONT_PX)  # the bitmap default is ~8 px: unreadable
    probe = ImageDraw.Draw(picture)
    line_height, swatch, pad = LEGEND_FONT_PX + 8, LEGEND_FONT_PX, 6
    lines: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    x = pad
    for name, colour in entries:
        width = swatch + 4 + int(probe.textlength(name, font=font)) + 2 * pad
        if lines[-1] and x + width > picture.width:
            lines.append([])
            x = pad
        lines[-1].append((name, colour, x))
        x += width
    canvas = Image.new("RGB", (picture.width, picture.height + len(lines) * line_height + pad), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        top = picture.height + pad // 2 + row * line_height
        for name, colour, left in line:
            draw.rectangle([left, top + 2, left + swatch, top + 2 + swatch], fill=colour, outline="black")
            draw.text((left + swatch + 4, top + 2), name, fill="black", font=font)
    return canvas


def features_to_rgb(features: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """Render (h, w, C) dense features as RGB: their first three principal components.

    Each component is min-max scaled to 0-255 and its sign fixed (largest loading positive) so
    the same features always give the same picture. `size=(height, width)` enlarges the
    result with nearest neighbour so that patch boundaries stay visible.
    """
    if features.ndim != 3 or min(features.shape) == 0:
        raise ValueError(f"features must be a non-empty (h, w, C) array, got {features.shape}")
    height, width, channels = features.shape
    flat = features.reshape(-1, channels).astype(np.float64)
    flat -= flat.mean(axis=0)
    _, vectors = np.linalg.eigh(flat.T @ flat)
    components = vectors[:, ::-1][:, : min(3, channels)]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
    projected = flat @ (components * np.where(signs == 0, 1, signs))
    projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = projected.min(axis=0), projected.max(axis=0)
    scaled = (projected - low) / np.where(high > low, high - low, 1.0)
    picture = Image.fromarray((scaled * 255).round().astype(np.uint8).reshape(height, width, 3))
    if size is not None:
        picture = picture.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return picture


_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [60, 9, 101], [150, 38, 103], [226, 80, 50], [250, 160, 20], [252, 255, 164]], dtype=np.float32
)
"""Dark violet -> red -> pale yellow: monotone in lightness, so the map also reads in grey."""
COLOUR_BAR_WIDTH = 72
"""Pixels `heatmap_overlay` adds to the right of the image for its colour bar and labels."""


def heat_colours(values: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours of values in [0, 1] (clipped), linear between the anchors."""
    position = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(position.astype(np.int64), len(_HEAT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * _HEAT_ANCHORS[low] + frac * _HEAT_ANCHORS[low + 1]).round().astype(np.uint8)


def heatmap_overlay(
    image: ImageLike,
    scores: np.ndarray,
    *,
    value_range: tuple[float, float] | None = None,
    threshold: float | None = None,
    alpha: float = 0.5,
    label: str = "",
) -> Image.Image:
    """Blend a heat map of (H, W) `scores` over the image and add a colour bar on the right.

    The result is (H, W + COLOUR_BAR_WIDTH): the bar spans the image height, low values at the
    bottom, labelled with `value_range` (default: the scores' min and max) and, if given, a
    line at `threshold`.
    """
    rgb = load_rgb(image)
    scores = np.asarray(scores, dtype=np.float32)
    if rgb.shape[:2] != scores.shape:
        raise ValueError(f"heatmap_overlay: image is {rgb.shape[0]}x{rgb.shape[1]} but the scores are {scores.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"heatmap_overlay alpha must be in [0, 1], got {alpha}")
    low, high = value_range if value_range is not None else (float(scores.min()), float(scores.max()))
    span = high - low if high > low else 1.0
    colours = heat_colours((scores - low) / span).astype(np.float32)
    blended = ((1 - alpha) * rgb.astype(np.float32) + alpha * colours).round().clip(0, 255).astype(np.uint8)
    height, width = scores.shape
    canvas = Image.new("RGB", (width + COLOUR_BAR_WIDTH, height), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    left, bar = width + 6, 12
    ramp = heat_colours(np.linspace(1.0, 0.0, height))[:, None, :].repeat(bar, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (left, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    text_x = left + bar + 4
    draw.text((text_x, 0), f"{high:.3g}", fill="black", font=font)
    draw.text((text_x, max(height - 12, 0)), f"{low:.3g}", fill="black", font=font)
    if label and height >= 48:
        draw.text((text_x, height // 2 - 6), label[:8], fill="black", font=font)
    if threshold is not None and low <= threshold <= high:
        y = int(round((high - threshold) / span * (height - 1)))
        draw.line([(left - 4, y), (left + bar + 3, y)], fill="black", width=2)
    return canvas
