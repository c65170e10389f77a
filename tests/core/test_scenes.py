"""Generated scenes: determinism, label range, mask/image agreement and on-disk layout."""

import json

import numpy as np
import pytest
from PIL import Image

from neco.scenes import SCENE_CLASSES, generate_scene, write_scene_dataset


def test_scene_is_deterministic_and_well_formed():
    a_img, a_mask = generate_scene(np.random.default_rng(7), size=(98, 140), num_classes=5)
    b_img, b_mask = generate_scene(np.random.default_rng(7), size=(98, 140), num_classes=5)
    assert a_img.shape == (98, 140, 3) and a_img.dtype == np.uint8
    assert a_mask.shape == (98, 140) and a_mask.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert set(np.unique(a_mask)) <= set(range(5))


def test_objects_differ_in_colour_from_background():
    """Each labelled region's mean colour is far from the background's: the mask is visible."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        img, mask = generate_scene(rng, size=(112, 112), num_classes=4)
        bg = img[mask == 0].reshape(-1, 3).mean(0)
        for label in set(np.unique(mask)) - {0}:
            region = img[mask == label].reshape(-1, 3)
            if len(region) > 50:
                seen.add(int(label))
                assert np.abs(region.mean(0) - bg).max() > 20
    assert seen == {1, 2, 3}


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_classes"):
        generate_scene(rng, num_classes=1)
    with pytest.raises(ValueError, match="size"):
        generate_scene(rng, size=(4, 4))


def test_dataset_layout(tmp_path):
    root = write_scene_dataset(tmp_path, splits={"train": 3, "val": 2}, size=(56, 70), num_classes=3, seed=1)
    assert json.loads((root / "classes.json").read_text()) == list(SCENE_CLASSES[:3])
    for split, n in (("train", 3), ("val", 2)):
        images = sorted((root / split / "images").glob("*.png"))
        masks = sorted((root / split / "masks").glob("*.png"))
        assert [p.name for p in images] == [p.name for p in masks] and len(images) == n
        img, mask = np.asarray(Image.open(images[0])), np.asarray(Image.open(masks[0]))
        assert img.shape == (56, 70, 3) and mask.shape == (56, 70) and mask.max() < 3
