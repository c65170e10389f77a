"""The demo's two summary pictures: a segmentation panel and a PCA sheet, readable at a glance.

- panel: one row per query, columns image | ground truth | start | after NeCo; masks are drawn
  as solid label maps (not blended into the image) in a fixed palette chosen to stand apart
  from the scenes' own colours, with a legend of the class names and the mIoU in the titles;
- PCA sheet: one row per query, columns image | PCA of the start's features | PCA after NeCo.

Every cell is enlarged with nearest-neighbour resampling, so patch boundaries stay visible.
Pillow + numpy only; this is demo code, not a client API.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (40, 40, 40),  # background: near black
    (255, 0, 200),  # magenta
    (0, 230, 255),  # cyan
    (255, 140, 0),  # orange
    (150, 255, 0),  # lime
    (255, 255, 255),  # white
)
"""Label colours of the panel: saturated extremes, unlike the scenes' muted random colours."""

TITLE_HEIGHT, GAP = 28, 6
TEXT_COLOUR, PAPER = (0, 0, 0), (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def label_map(mask: np.ndarray, scale: int) -> Image.Image:
    """(H, W) labels -> solid RGB picture, enlarged `scale` times with nearest neighbour."""
    if mask.max(initial=0) >= len(LABEL_COLOURS):
        raise ValueError(f"label {int(mask.max())} has no panel colour (at most {len(LABEL_COLOURS)} classes)")
    rgb = np.asarray(LABEL_COLOURS, dtype=np.uint8)[mask]
    return _enlarge(Image.fromarray(rgb), scale)


def _enlarge(picture: Image.Image, scale: int) -> Image.Image:
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def grid_sheet(
    rows: Sequence[Sequence[Image.Image]], titles: Sequence[str], footer: Image.Image | None = None
) -> Image.Image:
    """Cells of one size in rows, a title above each column, an optional footer (the legend)."""
    if not rows or any(len(r) != len(titles) for r in rows):
        raise ValueError(f"need at least one row of {len(titles)} cells")
    cell_w, cell_h = rows[0][0].size
    width = len(titles) * cell_w + (len(titles) + 1) * GAP
    height = TITLE_HEIGHT + len(rows) * (cell_h + GAP) + GAP + (footer.height if footer else 0)
    sheet = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(sheet)
    font = _font(15)
    for col, title in enumerate(titles):
        left = GAP + col * (cell_w + GAP)
        text_w = draw.textlength(title, font=font)
        draw.text((left + (cell_w - text_w) / 2, 6), title, fill=TEXT_COLOUR, font=font)
        for row, cells in enumerate(rows):
            sheet.paste(
                cells[col].convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST),
                (left, TITLE_HEIGHT + row * (cell_h + GAP)),
            )
    if footer is not None:
        sheet.paste(footer, (0, height - footer.height))
    return sheet


def legend(class_names: Sequence[str], width: int) -> Image.Image:
    """A strip of colour swatches with the class names, wrapped to `width`."""
    font, swatch, pad, line = _font(15), 16, 8, 24
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed: list[tuple[int, int, str, tuple[int, int, int]]] = []
    x, row = pad, 0
    for name, colour in zip(class_names, LABEL_COLOURS):
        entry = swatch + 6 + int(probe.textlength(name, font=font)) + 2 * pad
        if x > pad and x + entry > width:
            x, row = pad, row + 1
        placed.append((x, row, name, colour))
        x += entry
    strip = Image.new("RGB", (width, (row + 1) * line + pad), PAPER)
    draw = ImageDraw.Draw(strip)
    for left, r, name, colour in placed:
        top = pad // 2 + r * line
        draw.rectangle([left, top + 2, left + swatch, top + 2 + swatch], fill=colour, outline=TEXT_COLOUR)
        draw.text((left + swatch + 6, top + 2), name, fill=TEXT_COLOUR, font=font)
    return strip


def segmentation_panel(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: dict[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    scale: int = 2,
) -> Image.Image:
    """image | ground truth | one column per model (title = model label, e.g. 'start  mIoU 41.0')."""
    rows = [
        [_enlarge(Image.fromarray(image), scale), label_map(truth, scale)]
        + [label_map(masks[i], scale) for masks in predictions.values()]
        for i, (image, truth) in enumerate(zip(images, truths))
    ]
    titles = ["image", "ground truth", *predictions]
    width = len(titles) * rows[0][0].width + (len(titles) + 1) * GAP
    return grid_sheet(rows, titles, legend(class_names, width))


def pca_sheet(images: Sequence[np.ndarray], maps: dict[str, Sequence[Image.Image]], scale: int = 2) -> Image.Image:
    """image | the PCA picture of each model's features for it (same size, nearest neighbour)."""
    rows = [
        [_enlarge(Image.fromarray(image), scale)] + [pictures[i] for pictures in maps.values()]
        for i, image in enumerate(images)
    ]
    return grid_sheet(rows, ["image", *maps])
