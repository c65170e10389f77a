"""Overlay pictures, palette and the PCA rendering of dense features."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from neco.client import SegmentationResult, features_to_rgb
from neco.client.render import palette


def test_palette_is_distinct_and_voc_compatible() -> None:
    colours = palette(256)
    assert len({tuple(c) for c in colours}) == 256
    assert colours[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # Pascal VOC colours


def _result() -> tuple[SegmentationResult, np.ndarray]:
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:30, 20:50] = 2
    result = SegmentationResult(
        mask=mask, class_names=["sky", "road", "a very long class name"], confidence=np.ones((40, 60), np.float32)
    )
    return result, np.full((40, 60, 3), 200, dtype=np.uint8)


def test_overlay_blends_colours_and_adds_a_legend() -> None:
    result, image = _result()
    picture = result.overlay(image, alpha=0.5)
    assert picture.width == 60 and picture.height > 40  # legend strip below the image
    pixels = np.asarray(picture)
    np.testing.assert_array_equal(pixels[20, 30], (np.array([200, 200, 200]) + palette(3)[2]) / 2)
    np.testing.assert_array_equal(pixels[0, 0], [100, 100, 100])  # background class colour is black
    assert (pixels[40:] != 255).any()  # legend has content
    plain = result.overlay(image, legend=False)
    assert plain.size == (60, 40)
    with pytest.raises(ValueError, match="image is 10x10 but the mask is 40x60"):
        result.overlay(np.zeros((10, 10, 3), np.uint8))


def test_mask_image_round_trips_class_indices(tmp_path) -> None:
    result, _ = _result()
    result.mask_image().save(tmp_path / "mask.png")
    reread = Image.open(tmp_path / "mask.png")
    assert reread.mode == "P"
    np.testing.assert_array_equal(np.asarray(reread), result.mask)


def test_features_to_rgb_follows_the_main_variation() -> None:
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(32)
    ramp = np.linspace(-1, 1, 8)
    feats = ramp[None, :, None] * direction + 0.01 * rng.standard_normal((4, 8, 32))  # varies along width
    picture = features_to_rgb(feats.astype(np.float32), size=(40, 80))
    assert picture.size == (80, 40)
    red = np.asarray(features_to_rgb(feats.astype(np.float32)))[..., 0].astype(int)
    assert abs(np.corrcoef(red.mean(axis=0), ramp)[0, 1]) > 0.99  # first component = the ramp
    with pytest.raises(ValueError, match=r"\(h, w, C\)"):
        features_to_rgb(np.zeros((4, 4)))


def test_legend_text_is_readable_size() -> None:
    """The legend's text is drawn at LEGEND_FONT_PX (Pillow's default, 10 px, was hard to read)."""
    from neco.client.render import LEGEND_FONT_PX, overlay

    image = np.full((40, 200, 3), 128, np.uint8)
    mask = np.zeros((40, 200), np.int64)
    picture = overlay(image, mask, ["background"])
    text = np.asarray(picture)[40:, 6 + LEGEND_FONT_PX + 4 :]  # right of the colour swatch
    dark_rows = np.flatnonzero((text.min(axis=-1) < 100).any(axis=1))
    assert dark_rows.max() - dark_rows.min() + 1 >= LEGEND_FONT_PX - 1  # "background": ascender to descender
