"""Boundary IoU (Cheng et al., CVPR 2021): how well a mask's edges match, beside mIoU.

mIoU is dominated by object interiors: a mask whose edges are off by half a patch on every
side loses only a few points. Boundary IoU scores the edges alone. For a binary mask M and a
width d, the inner boundary band is

    B_d(M) = M minus (M eroded by a (2d + 1) x (2d + 1) square),

i.e. the pixels of M within chessboard distance d of a pixel outside M, the image border counting
as outside (the reference pads with zeros before eroding with a 3x3 kernel d times: the same band).
Per class c: boundary IoU = |B_d(G_c) & B_d(P_c)| / |B_d(G_c) | B_d(P_c)| for the ground-truth and
predicted masks of c. As with mIoU, intersections and unions are summed over the whole evaluated set,
then divided per class, and classes whose union is empty are left out of the mean. Pixels whose
target is ignore (255) are dropped from both bands.

d defaults to 2% of the image diagonal (the paper's choice), at least 1 px; `width=` fixes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from neco.contract import IGNORE_INDEX
from neco.evaluation.metrics import IoUResult, MetricError

DEFAULT_DILATION_RATIO = 0.02
"""Band width as a share of the image diagonal (Cheng et al.)."""


def band_width(shape: tuple[int, int], width: int | None = None, ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """`width` when given, else `ratio` of the diagonal of an image of `shape`, rounded, at least 1."""
    if width is not None:
        if width < 1:
            raise MetricError(f"boundary band width must be >= 1 px, got {width}")
        return width
    return max(1, int(round(ratio * float(np.hypot(*shape)))))


def _erode_axis(mask: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Minimum over a window of 2 width + 1 along `axis`, outside the image counting as False."""
    padded = np.pad(mask, [(width, width) if a == axis else (0, 0) for a in range(mask.ndim)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * width + 1, axis=axis)
    return windows.all(axis=-1)


def inner_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """B_d(mask): pixels of the binary mask within chessboard distance `width` of its outside."""
    mask = np.asarray(mask, dtype=bool)
    eroded = _erode_axis(_erode_axis(mask, width, 0), width, 1)  # a square is separable
    return mask & ~eroded


@dataclass
class BoundaryAccumulator:
    """Sum boundary-band intersections and unions per class over a dataset, then report IoUs."""

    class_names: list[str]
    width: int | None = None
    """Band width in pixels; None: 2% of each image's diagonal."""
    ignore_index: int = IGNORE_INDEX
    intersection: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.intersection = np.zeros(len(self.class_names), dtype=np.int64)
        self.union = np.zeros(len(self.class_names), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction, target = np.asarray(prediction), np.asarray(target)
        if prediction.shape != target.shape or prediction.ndim != 2:
            raise MetricError(f"prediction {prediction.shape} and target {target.shape} must be equal (H, W)")
        width = band_width(target.shape, self.width)
        valid = target != self.ignore_index
        present = np.union1d(np.unique(prediction), np.unique(target[valid]))
        for label in present:
            if not 0 <= label < len(self.class_names):
                raise MetricError(f"label {int(label)} outside [0, {len(self.class_names)})")
            truth = inner_boundary(target == label, width) & valid
            guess = inner_boundary(prediction == label, width) & valid
            self.intersection[label] += int(np.count_nonzero(truth & guess))
            self.union[label] += int(np.count_nonzero(truth | guess))

    def result(self) -> IoUResult:
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(self.union > 0, self.intersection / np.maximum(self.union, 1), np.nan)
        return IoUResult(per_class=per_class, class_names=list(self.class_names), pixel_accuracy=float("nan"))


def boundary_iou(
    predictions: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    class_names: Sequence[str],
    width: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> IoUResult:
    """Dataset-level boundary IoU over paired label maps; `.miou` is the mean over defined classes."""
    if len(predictions) != len(targets):
        raise MetricError(f"{len(predictions)} predictions for {len(targets)} targets")
    acc = BoundaryAccumulator(list(class_names), width, ignore_index)
    for prediction, target in zip(predictions, targets):
        acc.update(prediction, target)
    return acc.result()
