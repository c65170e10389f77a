"""Segmentation metrics: the ONE mIoU definition used by every evaluation in this project.

Everything goes through a confusion matrix so that per-image results can be accumulated over a
whole dataset exactly (summing matrices), instead of averaging per-image mIoUs, which would
weight small images as much as large ones and is not what the published protocols report.

Convention (same as the Hummingbird / MMSegmentation evaluators):
- pixels whose target is `IGNORE_INDEX` (255) are dropped before counting;
- IoU_c = TP_c / (TP_c + FP_c + FN_c);
- a class with TP + FP + FN = 0 (absent from both prediction and target over the whole
  evaluated set) has an undefined IoU (NaN) and is excluded from the mean; a class that is
  predicted but never present in the target (or vice versa) has IoU 0 and counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from neco.contract import IGNORE_INDEX
from neco.errors import InputError


class MetricError(InputError):
    """Prediction/target arrays that cannot be compared (shape or label range)."""


def confusion_matrix(
    prediction: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Count (target, prediction) label pairs: result[t, p], int64 of shape (C, C).

    Labels outside [0, num_classes) are an error (except `ignore_index` in the target): a
    silently dropped out-of-range label would inflate the score.
    """
    prediction = np.asarray(prediction)
    target = np.asarray(target)
    if prediction.shape != target.shape:
        raise MetricError(f"prediction shape {prediction.shape} != target shape {target.shape}")
    if num_classes <= 0:
        raise MetricError(f"num_classes must be positive, got {num_classes}")
    keep = target != ignore_index
    t = target[keep].astype(np.int64, copy=False)
    p = prediction[keep].astype(np.int64, copy=False)
    for name, values in (("target", t), ("prediction", p)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)][0]
            raise MetricError(f"{name} holds label {int(bad)} outside [0, {num_classes}) (ignore={ignore_index})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class IoUResult:
    """Per-class IoU (NaN where undefined) and their mean over defined classes."""

    per_class: np.ndarray
    class_names: list[str]
    pixel_accuracy: float

    @property
    def miou(self) -> float:
        defined = self.per_class[~np.isnan(self.per_class)]
        return float(defined.mean()) if defined.size else float("nan")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: NaN IoUs become None so the file stays strict JSON."""
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": {
                name: (None if np.isnan(v) else float(v)) for name, v in zip(self.class_names, self.per_class)
            },
        }

    def table(self) -> str:
        """A plain-text per-class table, classes excluded from the mean marked '-'."""
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"{'class':<{width}}  IoU"]
        for name, value in zip(self.class_names, self.per_class):
            lines.append(f"{name:<{width}}  {'-' if np.isnan(value) else f'{100 * value:5.1f}'}")
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou:5.1f}")
        return "\n".join(lines)


def iou_from_confusion(matrix: np.ndarray, class_names: Sequence[str] | None = None) -> IoUResult:
    """Per-class IoU and mIoU from an accumulated (C, C) confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise MetricError(f"confusion matrix must be square, got shape {matrix.shape}")
    n = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise MetricError(f"{len(names)} class names for a {n}-class confusion matrix")
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(union > 0, tp / union, np.nan)
    total = matrix.sum()
    return IoUResult(
        per_class=per_class, class_names=names, pixel_accuracy=float(tp.sum() / total) if total else float("nan")
    )


@dataclass
class ConfusionAccumulator:
    """Sum confusion matrices over a dataset, then report `IoUResult`."""

    class_names: list[str]
    ignore_index: int = IGNORE_INDEX
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((len(self.class_names), len(self.class_names)), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        self.matrix += confusion_matrix(prediction, target, len(self.class_names), self.ignore_index)

    def result(self) -> IoUResult:
        return iou_from_confusion(self.matrix, self.class_names)


def mean_iou(
    predictions: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    class_names: Sequence[str],
    ignore_index: int = IGNORE_INDEX,
) -> IoUResult:
    """Dataset-level IoU over paired label maps (sizes may differ between pairs)."""
    if len(predictions) != len(targets):
        raise MetricError(f"{len(predictions)} predictions for {len(targets)} targets")
    acc = ConfusionAccumulator(list(class_names), ignore_index)
    for prediction, target in zip(predictions, targets):
        acc.update(prediction, target)
    return acc.result()
