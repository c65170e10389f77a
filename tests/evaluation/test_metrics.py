"""mIoU against an independent, set-based computation on random label maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neco.contract import IGNORE_INDEX
from neco.evaluation.metrics import MetricError, confusion_matrix, iou_from_confusion, mean_iou


def reference_ious(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int) -> list[float | None]:
    """Per-class IoU from pixel-coordinate sets: |P_c ∩ T_c| / |P_c ∪ T_c| over valid pixels."""
    out: list[float | None] = []
    for c in range(num_classes):
        inter = union = 0
        for img, (p, t) in enumerate(zip(preds, targets)):
            valid = {(img, i, j) for i, j in zip(*np.nonzero(t != IGNORE_INDEX))}
            pset = {(img, i, j) for i, j in zip(*np.nonzero(p == c))} & valid
            tset = {(img, i, j) for i, j in zip(*np.nonzero(t == c))}
            inter += len(pset & tset)
            union += len(pset | tset)
        out.append(inter / union if union else None)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_set_based_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_classes = 6
    preds, targets = [], []
    for size in ((9, 7), (5, 11), (8, 8)):
        # Class 5 is never in the target; class 4 is never predicted; class 3 appears nowhere.
        t = rng.choice([0, 1, 2, 4, IGNORE_INDEX], size=size).astype(np.uint8)
        p = rng.choice([0, 1, 2, 5], size=size).astype(np.uint8)
        preds.append(p)
        targets.append(t)
    result = mean_iou(preds, targets, [f"c{i}" for i in range(num_classes)])
    ref = reference_ious(preds, targets, num_classes)
    for got, want in zip(result.per_class, ref):
        if want is None:
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want)
    assert ref[3] is None and ref[4] == 0.0 and ref[5] == 0.0
    defined = [v for v in ref if v is not None]
    assert result.miou == pytest.approx(sum(defined) / len(defined))
    assert result.to_dict()["per_class_iou"]["c3"] is None


def test_perfect_and_ignore() -> None:
    t = np.array([[0, 1], [IGNORE_INDEX, 2]], dtype=np.uint8)
    p = np.array([[0, 1], [1, 2]], dtype=np.uint8)  # the wrong pixel is ignored
    assert mean_iou([p], [t], ["a", "b", "c"]).miou == 1.0


def test_dataset_level_not_mean_of_images() -> None:
    # image 1: class 0 perfect (1 px); image 2: class 0 half right over many pixels.
    t1, p1 = np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.uint8)
    t2 = np.zeros((1, 10), np.uint8)
    p2 = np.array([[0] * 5 + [1] * 5], np.uint8)
    r = mean_iou([p1, p2], [t1, t2], ["a", "b"])
    assert r.per_class[0] == pytest.approx(6 / 11)
    assert r.per_class[1] == 0.0


def test_errors() -> None:
    with pytest.raises(MetricError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(MetricError, match="target holds label 7"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), 3)
    with pytest.raises(MetricError, match="prediction holds label 3"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2)), 3)
    with pytest.raises(MetricError, match="class names"):
        iou_from_confusion(np.eye(3), ["a"])
