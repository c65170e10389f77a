"""Pictures of results: label colour palette, mask overlays with a legend, PCA->RGB features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neco.contract import IGNORE_INDEX

from .images import ImageLike, load_rgb


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
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(picture)
    line_height, swatch, pad = 16, 12, 6
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
            draw.text((left + swatch + 4, top + 1), name, fill="black", font=font)
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
