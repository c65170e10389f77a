"""The served signature's size rule follows the model's patch size, never a constant."""

from __future__ import annotations

import numpy as np
import pytest

from neco.contract import OUTPUT_CLS, OUTPUT_FEATURES, registered_patch_sizes
from neco.signature import ImageShapeError, check_image_shape, check_images, output_shape


def test_the_rule_is_the_served_models_patch() -> None:
    dinov3 = np.zeros((1, 224, 320, 3), np.uint8)  # 14 x 20 patches of 16 px; 320 is no multiple of 14
    assert check_images(dinov3, patch_size=16).shape == dinov3.shape
    with pytest.raises(ImageShapeError, match="multiple of the patch size 14 "):
        check_images(dinov3, patch_size=14)
    with pytest.raises(ImageShapeError, match="multiple of the patch size 16 "):
        check_images(np.zeros((1, 224, 308, 3), np.uint8), patch_size=16)
    assert output_shape(OUTPUT_FEATURES, 1, 224, 320, 384, patch_size=16) == (1, 14, 20, 384)
    assert output_shape(OUTPUT_CLS, 2, 224, 320, 384, patch_size=16) == (2, 384)


def test_without_a_model_only_sides_that_suit_no_registered_patch_are_refused() -> None:
    """A gateway that has not asked the server which model it serves must not refuse DINOv3 sizes."""
    assert registered_patch_sizes() == (14, 16)
    assert check_image_shape([1, 224, 320, 3], None) == (1, 224, 320)
    assert check_image_shape([1, 28, 42, 3], None) == (1, 28, 42)
    with pytest.raises(ImageShapeError, match="multiple of the patch size 14 or 16"):
        check_image_shape([1, 28, 32, 3], None)  # 28 suits 14 only, 32 suits 16 only
