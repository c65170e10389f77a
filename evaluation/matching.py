"""Matching predicted labels to ground-truth classes, and the published "all classes" mIoU.

Unsupervised and in-context evaluations of the dense-SSL literature (Leopart, NeCo,
open-hummingbird-eval) do not trust the predicted label ids: they first map every predicted
label (a cluster, or a retrieved class) to a ground-truth class, then score. Two mappings:

- Hungarian (one-to-one, as many predicted labels as classes): the assignment that maximises the
  total IoU of the matched (class, label) pairs (`scipy.optimize.linear_sum_assignment`);
- many-to-one (overclustering, more clusters than classes): each cluster goes to the class it
  overlaps most (most pixels in common).

Both work on a confusion matrix `confusion[t, p]` (ground-truth class t, predicted label p) summed
over the whole split, so remapping is exact and cheap. The published mean then runs over ALL
classes, each `tp / max(tp + fp + fn, 1e-8)`: a class absent from the split scores 0. This differs
from `metrics.iou_from_confusion` (the strict protocol), which leaves undefined classes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neco.evaluation.metrics import MetricError

PUBLISHED_EPS: float = 1e-8
"""Denominator floor of the published per-class IoU (absent classes score 0, not NaN)."""


def _check(confusion: np.ndarray) -> np.ndarray:
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or 0 in confusion.shape:
        raise MetricError(f"confusion matrix must be a non-empty (classes, labels) matrix, got {confusion.shape}")
    return confusion.astype(np.float64, copy=False)


def pair_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU of every (class t, predicted label p) pair as if p alone were class t: (C, K)."""
    confusion = _check(confusion)
    union = confusion.sum(1, keepdims=True) + confusion.sum(0, keepdims=True) - confusion
    return np.divide(confusion, union, out=np.zeros_like(confusion), where=union > 0)


def hungarian_mapping(confusion: np.ndarray) -> np.ndarray:
    """(K,) class of every predicted label under the max-total-IoU one-to-one assignment.

    Needs K == C (the published protocols match only when there are as many labels as classes).
    """
    from scipy.optimize import linear_sum_assignment

    confusion = _check(confusion)
    if confusion.shape[0] != confusion.shape[1]:
        raise MetricError(f"Hungarian matching needs as many labels as classes, got {confusion.shape}")
    classes, labels = linear_sum_assignment(pair_iou(confusion), maximize=True)
    mapping = np.empty(confusion.shape[1], dtype=np.int64)
    mapping[labels] = classes
    return mapping


def many_to_one_mapping(confusion: np.ndarray) -> np.ndarray:
    """(K,) class each predicted label overlaps most (ties: lowest class index)."""
    return _check(confusion).argmax(axis=0).astype(np.int64)


def remap_confusion(confusion: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(C, C) confusion after relabelling predicted label p as class mapping[p]."""
    confusion = _check(confusion)
    mapping = np.asarray(mapping, dtype=np.int64)
    num_classes = confusion.shape[0]
    if mapping.shape != (confusion.shape[1],) or mapping.min() < 0 or mapping.max() >= num_classes:
        raise MetricError(f"mapping must send each of {confusion.shape[1]} labels to a class in [0, {num_classes})")
    out = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(out.T, mapping, confusion.T)
    return out


@dataclass(frozen=True)
class MatchedIoU:
    """Per-class IoU of the published mean (absent classes 0) and how labels were matched."""

    per_class: np.ndarray
    class_names: list[str]
    pixel_accuracy: float
    matching: str
    mapping: np.ndarray

    @property
    def miou(self) -> float:
        return float(self.per_class.mean())

    def table(self) -> str:
        """Plain-text per-class IoU table (every class counts in the mean)."""
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"{'class':<{width}}  IoU"] + [
            f"{name:<{width}}  {100 * v:5.1f}" for name, v in zip(self.class_names, self.per_class)
        ]
        return "\n".join([*lines, f"{'mIoU':<{width}}  {100 * self.miou:5.1f}  ({self.matching} matching)"])

    def to_dict(self) -> dict[str, object]:
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "matching": self.matching,
            "per_class_iou": {name: float(v) for name, v in zip(self.class_names, self.per_class)},
        }


def published_iou(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-class tp / max(tp + fp + fn, 1e-8), pixel accuracy) of a square confusion matrix."""
    matrix = _check(matrix)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    total = matrix.sum()
    return tp / np.maximum(union, PUBLISHED_EPS), float(tp.sum() / total) if total else float("nan")


def matched_miou(confusion: np.ndarray, class_names: Sequence[str], matching: str = "hungarian") -> MatchedIoU:
    """Match labels to classes (`hungarian`, `many-to-one` or `none`), then the published mIoU."""
    confusion = _check(confusion)
    if len(class_names) != confusion.shape[0]:
        raise MetricError(f"{len(class_names)} class names for {confusion.shape[0]} confusion rows")
    if matching == "hungarian":
        mapping = hungarian_mapping(confusion)
    elif matching == "many-to-one":
        mapping = many_to_one_mapping(confusion)
    elif matching == "none":
        if confusion.shape[0] != confusion.shape[1]:
            raise MetricError(f"matching='none' needs a square confusion matrix, got {confusion.shape}")
        mapping = np.arange(confusion.shape[1])
    else:
        raise MetricError(f"unknown matching {matching!r}; use hungarian, many-to-one or none")
    per_class, accuracy = published_iou(remap_confusion(confusion, mapping))
    return MatchedIoU(per_class, list(class_names), accuracy, matching, mapping)
