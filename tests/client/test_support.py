"""Soft labels on hand-made masks, rare-class sampling, and support-set forms/errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.client import SupportSetError
from neco.client.support import iter_pairs, open_support, patch_soft_labels, sample_rare_first

P = 14


def test_soft_labels_are_class_frequencies_of_each_patch() -> None:
    mask = np.zeros((2 * P, 2 * P), dtype=np.int64)
    mask[:P, P:] = 1  # patch (0, 1): all class 1
    mask[P:, :P][: P // 2] = 2  # patch (1, 0): top half class 2, bottom half class 0
    mask[P:, P:] = 255  # patch (1, 1): only ignore pixels -> dropped
    mask[0, 0] = 255  # one ignore pixel in patch (0, 0) does not count
    soft, keep = patch_soft_labels(mask, P, num_classes=3, name="hand-made")
    np.testing.assert_allclose(soft[0], [1, 0, 0])
    np.testing.assert_allclose(soft[1], [0, 1, 0])
    np.testing.assert_allclose(soft[2], [0.5, 0, 0.5])
    np.testing.assert_array_equal(keep, [True, True, True, False])
    np.testing.assert_allclose(soft[3], 0)


def test_soft_labels_mixed_patch_with_ignore() -> None:
    mask = np.full((P, P), 255)
    mask[:, :3] = 4
    mask[:, 3:4] = 1
    soft, keep = patch_soft_labels(mask, P, num_classes=None, name="m")
    assert soft.shape == (1, 5) and keep.all()
    np.testing.assert_allclose(soft[0], [0, 0.25, 0, 0, 0.75])  # 3 of 4 labelled columns are class 4


def test_labels_beyond_the_class_list_are_rejected() -> None:
    mask = np.zeros((P, P), dtype=np.int64)
    mask[0, :2] = (7, 9)
    with pytest.raises(SupportSetError, match=r"labels \[7, 9\] beyond the 4 known classes"):
        patch_soft_labels(mask, P, num_classes=4, name="support item 3")


def test_rare_class_sampling_favours_small_objects() -> None:
    # 100 patches: 95 of class 0, 5 of class 1; keep 10.
    soft = np.zeros((100, 2), dtype=np.float32)
    soft[:95, 0] = 1
    soft[95:, 1] = 1
    rng = np.random.default_rng(0)
    rare_share = np.mean([(sample_rare_first(soft, 10, rng) >= 95).sum() / 10 for _ in range(200)])
    # Uniform sampling would keep 5% rare patches; inverse-frequency weights (19:1) keep most of them.
    assert rare_share > 0.35
    picked = sample_rare_first(soft, 10, rng)
    assert len(picked) == len(set(picked.tolist())) == 10 and picked.max() < 100
    np.testing.assert_array_equal(sample_rare_first(soft, 500, rng), np.arange(100))  # budget >= patches


def test_support_folder_pairs_and_class_names(tmp_path: Path) -> None:
    for sub in ("images", "masks"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    for stem in ("a", "b"):
        Image.new("RGB", (14, 14)).save(tmp_path / "train" / "images" / f"{stem}.png")
        Image.new("L", (14, 14)).save(tmp_path / "train" / "masks" / f"{stem}.png")
    (tmp_path / "classes.json").write_text(json.dumps(["bg", "thing"]))
    support = open_support(tmp_path / "train")
    assert support.length == 2 and support.class_names == ["bg", "thing"]
    assert [p[1].name for p in support.items] == ["a.png", "b.png"]
    assert open_support(tmp_path / "train", class_names=["x", "y"]).class_names == ["x", "y"]

    (tmp_path / "train" / "masks" / "b.png").unlink()
    with pytest.raises(SupportSetError, match="has no mask named b"):
        open_support(tmp_path / "train")
    with pytest.raises(SupportSetError, match="images/ and masks/"):
        open_support(tmp_path)
    with pytest.raises(SupportSetError, match="does not exist"):
        open_support(tmp_path / "nope")


def test_dataset_objects_and_bad_items() -> None:
    class Dataset:
        class_names = ["bg", "fg"]

        def __iter__(self):
            yield np.zeros((14, 14, 3), np.uint8), np.zeros((14, 14), np.uint8)
            yield "not a pair"

    support = open_support(Dataset())
    assert support.class_names == ["bg", "fg"] and support.length is None
    with pytest.raises(SupportSetError, match="item 1 .* not an \\(image, mask\\) pair"):
        list(iter_pairs(support))
    with pytest.raises(SupportSetError, match="must be"):
        open_support(42)
