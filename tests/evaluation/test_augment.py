"""The published protocol's resizing equals open-hummingbird-eval's torch calls (issue 30, item 1).

The reference resizes masks with `F.interpolate(mode="nearest")` and images with bilinear +
antialias on float tensors; the project does it in numpy (evaluation stays torch-free on the
client-backend path), so torch here is the independent computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from neco.evaluation.augment import (
    SquareViews,
    nearest_centre_index,
    nearest_floor_index,
    resize_bilinear_aa,
    resize_nearest_floor,
)

ODD_SIZES = [(375, 500), (333, 111), (500, 375), (7, 10)]


def _torch_image(image: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _torch_mask(mask: np.ndarray, size: int) -> np.ndarray:
    out = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(size, size), mode="nearest")
    return out[0, 0].numpy().astype(mask.dtype)


@pytest.mark.parametrize("shape", ODD_SIZES)
def test_square_views_match_torch_pixel_for_pixel(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, shape).astype(np.uint8)
    mask[:, ::3] = 255  # ignore bands survive untouched
    resized_image, resized_mask = SquareViews([(image, mask)], 448)[0]
    np.testing.assert_array_equal(resized_mask, _torch_mask(mask, 448))
    assert np.abs(resized_image.astype(np.float64) - _torch_image(image, 448)).max() <= 1.0


def test_nearest_uses_torch_float32_floor_on_every_size() -> None:
    # Where i * in / out is an integer, float32 rounding decides; every in-size up to 600 must agree.
    for out_size in (100, 448, 518):
        for in_size in range(1, 601):
            line = torch.arange(in_size, dtype=torch.float32)[None, None]
            expected = F.interpolate(line, size=out_size, mode="nearest")[0, 0].long().numpy()
            np.testing.assert_array_equal(nearest_floor_index(in_size, out_size), expected, err_msg=f"{in_size}")


def test_centre_rule_is_pil_nearest_on_every_size() -> None:
    # The NeCo overclustering masks go through torchvision's Resize(NEAREST) on PIL images.
    for out_size in (100, 448, 333):
        for in_size in range(1, 601):
            line = Image.fromarray(np.arange(in_size, dtype=np.int32)[None], mode="I")
            expected = np.asarray(line.resize((out_size, 1), Image.Resampling.NEAREST))[0]
            np.testing.assert_array_equal(nearest_centre_index(in_size, out_size), expected, err_msg=f"{in_size}")


def test_downscaling_averages_and_upscaling_interpolates() -> None:
    stripes = np.zeros((4, 8, 3), np.uint8)
    stripes[:, 1::2] = 200
    # Antialiased: interior outputs average four stripes (weights 1/8, 3/8, 3/8, 1/8), no aliasing.
    np.testing.assert_array_equal(resize_bilinear_aa(stripes, (4, 4))[:, 1:3], np.full((4, 2, 3), 100))
    mask = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(resize_nearest_floor(mask, (2, 6)), [[1, 1, 2, 2, 3, 3]] * 2)
