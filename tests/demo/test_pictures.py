"""The demo's panel and PCA sheet: layout, titles, legend colours and nearest-neighbour cells."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from neco.demo.pictures import GAP, LABEL_COLOURS, TITLE_HEIGHT, label_map, pca_sheet, segmentation_panel
from neco.scenes import generate_scene

SIZE, SCALE = 56, 2


def _queries(n: int):
    rng = np.random.default_rng(0)
    return [generate_scene(rng, size=(SIZE, SIZE), num_classes=4, family="textures") for _ in range(n)]


def _has_text(region: np.ndarray) -> bool:
    return bool((region.min(-1) < 100).sum() > 10)  # dark glyph pixels on white paper


def test_panel_layout_titles_and_legend(tmp_path):
    queries = _queries(3)
    images, truths = [q[0] for q in queries], [q[1] for q in queries]
    shifted = [np.roll(t, 5, axis=1) for t in truths]
    names = ["background", "stripes_h", "stripes_v", "dots"]
    path = tmp_path / "panel.png"
    segmentation_panel(images, truths, {"start  mIoU 40.0": shifted, "after NeCo  mIoU 50.0": truths}, names).save(path)
    panel = np.asarray(Image.open(path).convert("RGB"))
    cell = SIZE * SCALE
    assert panel.shape[1] == 4 * cell + 5 * GAP
    grid_bottom = TITLE_HEIGHT + 3 * (cell + GAP)
    assert panel.shape[0] > grid_bottom  # the legend sits below the grid
    for col in range(4):
        left = GAP + col * (cell + GAP)
        assert _has_text(panel[:TITLE_HEIGHT, left : left + cell]), f"column {col} has no title"
    # row 0: the image enlarged 2x with nearest neighbour; the truths drawn as solid label colours
    top = TITLE_HEIGHT
    np.testing.assert_array_equal(panel[top : top + cell : SCALE, GAP : GAP + cell : SCALE], images[0])
    truth_cell = panel[top : top + cell, 2 * GAP + cell : 2 * GAP + 2 * cell]
    expected = np.asarray(LABEL_COLOURS, dtype=np.uint8)[np.kron(truths[0], np.ones((SCALE, SCALE), int))]
    np.testing.assert_array_equal(truth_cell, expected)
    after_cell = panel[top : top + cell, 4 * GAP + 3 * cell : 4 * GAP + 4 * cell]
    np.testing.assert_array_equal(after_cell, expected)
    legend = panel[grid_bottom:].reshape(-1, 3)
    for colour in LABEL_COLOURS[: len(names)]:
        assert (legend == colour).all(1).sum() > 50, f"legend lacks swatch {colour}"
    assert _has_text(panel[grid_bottom:])


def test_panel_colours_stand_apart_from_scene_colours():
    """No panel colour is close to a typical scene pixel: masks cannot be read as image content."""
    pixels = np.concatenate([q[0].reshape(-1, 3) for q in _queries(6)]).astype(np.float64)
    for colour in LABEL_COLOURS[1:]:
        distance = np.abs(pixels - np.asarray(colour)).max(1)
        assert np.mean(distance < 30) < 0.02


def test_pca_sheet_and_bad_labels():
    queries = _queries(2)
    images = [q[0] for q in queries]
    maps = {
        "PCA start": [Image.new("RGB", (SIZE * SCALE,) * 2, "red")] * 2,
        "PCA after NeCo": [Image.new("RGB", (SIZE * SCALE,) * 2, "blue")] * 2,
    }
    sheet = np.asarray(pca_sheet(images, maps))
    cell = SIZE * SCALE
    assert sheet.shape == (TITLE_HEIGHT + 2 * (cell + GAP) + GAP, 3 * cell + 4 * GAP, 3)
    np.testing.assert_array_equal(sheet[TITLE_HEIGHT + 10, GAP + cell + GAP + 10], (255, 0, 0))
    with pytest.raises(ValueError, match="colour"):
        label_map(np.full((4, 4), len(LABEL_COLOURS), np.uint8), 1)
