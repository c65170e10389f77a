"""The published Hummingbird protocol (open-hummingbird-eval v2.0.0) as one pure function.

`neco eval hummingbird` offers two protocols over the same k-NN label transfer:

- `hbird-eval` (default for the VOC / ADE20k / COCO-Stuff / Cityscapes layouts): the scoring of
  open-hummingbird-eval, whose numbers NeCo, DIP and the open-hummingbird-eval tables report.
  Its facts, all implemented here:
  * images (bilinear + antialias) AND masks (torch `nearest`: floor(i * in / out)) are resized to
    input_size x input_size and scored there (`augment.square`, equal to the reference's torch calls);
  * memory labels: ignore pixels (255) become class 0, then each patch's label is the one-hot
    mean over its pixels; all-ignore patches are kept (as class 0);
  * bounded memory: per image, patch score = sum over the classes present in the patch of the
    number of the image's patches containing that class, times U(0, 1); patches without any
    label score 1e6; the K smallest scores are kept (rare classes first);
  * every memory pass, the first included, is augmented (`augment.hbird_memory_view`);
  * mIoU: one confusion matrix over the split (255 ignored), predicted labels matched to classes
    by the Hungarian algorithm (max total IoU), mean over ALL classes of tp / max(tp+fp+fn, 1e-8).
- `strict` (the project's own): bank from unaugmented support images at the client's resize
  policy, ignore pixels excluded from the soft labels, masks scored at their own full size, no
  label matching, and classes absent from both prediction and target left out of the mean.
  It measures what `neco segment` gives an application; its numbers are not comparable with
  the papers (see docs/evaluation.md).

This module takes features that are already computed, so the whole protocol is testable without
a model; `hummingbird.run_hbird_eval` feeds it from a backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from neco.contract import DEFAULT_K, DEFAULT_TEMPERATURE, IGNORE_INDEX, IMAGENET_STD
from neco.errors import InputError
from neco.evaluation.matching import MatchedIoU, matched_miou
from neco.evaluation.metrics import MetricError, confusion_matrix

Protocol = Literal["hbird-eval", "strict"]
PROTOCOLS: tuple[Protocol, ...] = ("hbird-eval", "strict")
PROTOCOL_HELP: dict[str, str] = {
    "hbird-eval": (
        "open-hummingbird-eval v2.0.0 scoring (comparable with NeCo / DIP / open-hummingbird-eval tables): "
        "square-resized masks, 255->0 memory labels, augmented memory, Hungarian-matched mIoU over all classes"
    ),
    "strict": (
        "this project's scoring (what `neco segment` gives applications): full-size masks, ignore pixels "
        "excluded, no label matching, classes absent from prediction and target left out of the mean"
    ),
}
HBIRD_EVAL_STD_TYPO: tuple[float, float, float] = (IMAGENET_STD[0], IMAGENET_STD[1], 0.255)
"""open-hummingbird-eval's ImageNet std: 0.255 for blue is a typo of 0.225. Used only on request."""
UNLABELLED_SCORE: float = 1e6
"""Memory score of a patch without any label: it is kept only when nothing else is left."""


class ProtocolError(InputError):
    """Features and masks that the protocol cannot score together."""


def memory_labels(mask: np.ndarray, patch_size: int, num_classes: int) -> np.ndarray:
    """(P, C) per-patch label distribution with ignore pixels counted as class 0.

    `mask` is (H, W) with sides multiples of `patch_size`; rows are patches in row-major order.
    """
    height, width = mask.shape
    if height % patch_size or width % patch_size:
        raise ProtocolError(f"mask {height}x{width} is not a multiple of the patch size {patch_size}")
    labels = np.where(mask == IGNORE_INDEX, 0, mask).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ProtocolError(f"mask holds label {int(labels.max())} outside [0, {num_classes}) (255 = ignore)")
    rows, cols = height // patch_size, width // patch_size
    patches = labels.reshape(rows, patch_size, cols, patch_size).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    flat = (np.arange(rows * cols)[:, None] * num_classes + patches).ravel()
    counts = np.bincount(flat, minlength=rows * cols * num_classes).reshape(rows * cols, num_classes)
    return (counts / (patch_size * patch_size)).astype(np.float32)


def memory_scores(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(P,) sampling score of every patch of one image (smaller is kept first)."""
    present = labels > 0
    patches_with_class = present.sum(axis=0)
    scores = (present * patches_with_class).sum(axis=1).astype(np.float64)
    labelled = present.any(axis=1)
    scores[~labelled] = UNLABELLED_SCORE
    scores[labelled] *= rng.random(int(labelled.sum()))
    return scores


def select_memory(labels: np.ndarray, budget: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of the `budget` patches with the smallest scores (all patches when None)."""
    if budget is None or budget >= labels.shape[0]:
        return np.arange(labels.shape[0])
    if budget < 1:
        raise ProtocolError(f"memory budget per image must be >= 1, got {budget}")
    return np.argsort(memory_scores(labels, rng), kind="stable")[:budget]


def _patch_size(features: np.ndarray, mask: np.ndarray, what: str) -> int:
    if features.ndim != 3 or mask.ndim != 2:
        raise ProtocolError(f"{what}: features must be (h, w, C) and masks (H, W), got {features.shape}, {mask.shape}")
    (h, w), (height, width) = features.shape[:2], mask.shape
    patch = height // h
    if patch < 1 or height != h * patch or width != w * patch:
        raise ProtocolError(f"{what}: a {height}x{width} mask is not a whole-patch multiple of a {h}x{w} feature grid")
    return patch


@dataclass(frozen=True)
class HbirdEvalResult:
    iou: MatchedIoU
    bank_patches: int
    num_queries: int


def hbird_eval(
    bank: Iterable[tuple[np.ndarray, np.ndarray]],
    queries: Iterable[tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    memory_per_image: int | None = None,
    seed: int = 0,
    upsample: Literal["bilinear", "guided"] = "bilinear",
) -> HbirdEvalResult:
    """Score `queries` against a memory built from `bank` with the published protocol.

    Both iterables yield ((h, w, C) unit-norm features, (H, W) mask at the square input size);
    for the memory those are the augmented views. `memory_per_image` is the K of the bounded
    memory. Returns the Hungarian-matched mIoU over all classes. `upsample="guided"` (not the
    published protocol) needs each query as (features, mask, (H, W, 3) image at the mask's size).
    """
    import faiss

    from neco.client.retrieval import transfer_labels, upsample_bilinear
    from neco.client.upsample import check_guide, check_method, guided_argmax

    num_classes = len(class_names)
    rng = np.random.default_rng(seed)
    feature_parts, label_parts = [], []
    for features, mask in bank:
        patch = _patch_size(features, mask, "memory image")
        labels = memory_labels(mask, patch, num_classes)
        keep = select_memory(labels, memory_per_image, rng)
        feature_parts.append(features.reshape(-1, features.shape[-1])[keep].astype(np.float32))
        label_parts.append(labels[keep])
    if not feature_parts:
        raise ProtocolError("the memory is empty: no support images")
    memory = np.ascontiguousarray(np.concatenate(feature_parts))
    memory_labels_ = np.concatenate(label_parts)
    if memory.shape[0] < k:
        raise ProtocolError(f"the memory holds {memory.shape[0]} patches, fewer than k={k}")
    index = faiss.IndexFlatIP(memory.shape[1])
    index.add(memory)

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    count = 0
    check_method(upsample)
    for features, mask, *image in queries:
        _patch_size(features, mask, "query image")
        if upsample == "guided" and not image:
            raise ProtocolError("guided upsampling needs (features, mask, image) queries")
        h, w, channels = features.shape
        if channels != memory.shape[1]:
            raise ProtocolError(f"query features have {channels} channels, the memory {memory.shape[1]}")
        sims, neighbours = index.search(np.ascontiguousarray(features.reshape(-1, channels), dtype=np.float32), k)
        scores = transfer_labels(sims, neighbours, memory_labels_, temperature)
        grid = np.ascontiguousarray(scores.T).reshape(num_classes, h, w)
        if upsample == "guided":
            prediction = guided_argmax(grid, check_guide(image[0], mask.shape), keep_scores=False)[0]
        else:
            prediction = upsample_bilinear(grid, mask.shape).argmax(axis=0)
        try:
            confusion += confusion_matrix(prediction, mask, num_classes)
        except MetricError as exc:
            raise ProtocolError(f"query mask: {exc}") from None
        count += 1
    if count == 0:
        raise ProtocolError("no query images to score")
    return HbirdEvalResult(matched_miou(confusion, class_names, "hungarian"), memory.shape[0], count)
