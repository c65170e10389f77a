"""k-NN label transfer: THE one code path from query features to a segmentation mask.

Hummingbird-style retrieval (Balažević et al., 2023): for every query patch, find the k
nearest bank patches by inner product (cosine on unit vectors), weight them by
softmax(similarity / temperature), sum their soft labels, upsample the per-class scores
bilinearly to the input size and take the argmax. The evaluation stage calls the same
functions, so the published protocol and the product share one implementation.

Upsampling convention: half-pixel centres ("align_corners=False", as torch's
`F.interpolate(..., mode="bilinear", align_corners=False)`, checked by a test): output pixel o maps
to source coordinate (o + 0.5) * in / out - 0.5, clamped to the grid edges. `upsample="guided"`
replaces the bilinear step by image-guided joint bilateral upsampling (`neco.client.upsample`), with
the same geometry; every `SegmentationResult` names the upsampler that produced it.

Novelty maps (`novelty`, see `neco.client.novelty`) are upsampled the same way, so pixel (y, x)
of a novelty map and of a mask describe the same place; `segment(..., unknown=...)` uses that
to give novel pixels an explicit "unknown" label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neco.client.backend import FeatureBackend, batch_features, prepare_for
from neco.client.bank import MemoryBank
from neco.client.bank_io import MANIFEST
from neco.client.errors import BankContractError, BankError, NoveltyError, NoveltyNotCalibratedError
from neco.client.images import ImageLike, PreparedImage, SizeSpec
from neco.client.novelty import (
    DEFAULT_ACCEPTANCE,
    DEFAULT_AGGREGATION,
    DEFAULT_KNN_K,
    DEFAULT_METHOD,
    METHODS,
    Aggregation,
    Calibration,
    NoveltyMethod,
    NoveltySpec,
    aggregate,
    calibrate,
    check_aggregation,
)
from neco.client.render import heatmap_overlay, mask_to_image, overlay
from neco.client.size_policy import build_for_query, check_query_size
from neco.client.upsample import (
    DEFAULT_UPSAMPLE,
    UpsampleMethod,
    bilinear_argmax,
    check_guide,
    check_method,
    guided_argmax,
    upsample_bilinear,
)
from neco.contract import DEFAULT_K, DEFAULT_TEMPERATURE, ModelContract

UNKNOWN_LABEL = "unknown"
"""Class name `segment(..., unknown=...)` appends for novel pixels (their mask value is K)."""


@dataclass(frozen=True)
class SegmentationResult:
    """A predicted mask at the input image's size, with its class names and confidences."""

    mask: np.ndarray
    """(H, W) class indices into `class_names` (uint8, or uint16 beyond 256 classes)."""
    class_names: list[str]
    confidence: np.ndarray
    """(H, W) float32 score of the chosen class (the transferred label mass, in [0, 1])."""
    scores: np.ndarray | None = None
    """(K, H, W) float32 per-class scores, when requested (`return_scores=True`)."""
    input_size: tuple[int, int] | None = None
    """(H, W) the query was resized to for the encoder (by the bank's size policy, or `size=`); results
    depend on it, so it is reported with them. None for `segment_features`, which never saw the image."""
    image: PreparedImage | None = field(default=None, repr=False, compare=False)
    """The query as `segment` prepared it (None for `segment_features`): what `overlay` draws on."""
    upsample: UpsampleMethod = "bilinear"
    """How the patch scores were brought to pixels: "bilinear" or "guided" (by the image)."""

    def overlay(self, image: ImageLike | None = None, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The input image (by default the query `segment` decoded) with class colours and a legend."""
        if image is None and (self.image is None or self.image.original is None):
            raise ValueError("this result holds no image (segment_features never saw one): pass the image")
        return overlay(self.image.original if image is None else image, self.mask, self.class_names, alpha, legend)

    def mask_image(self) -> Image.Image:
        """A palette image whose pixel values are the class indices (save it as PNG)."""
        return mask_to_image(self.mask, len(self.class_names))


@dataclass(frozen=True)
class NoveltyResult:
    """A novelty map at the input image's size, its image-level score and the decision."""

    scores: np.ndarray
    """(H, W) float32 novelty (higher = more novel), bilinear like `segment`'s class scores."""
    patch_scores: np.ndarray
    """(h, w) float32 novelty of each patch of the encoder's grid."""
    score: float
    """Image-level novelty: `aggregation` of `patch_scores`."""
    method: NoveltyMethod
    aggregation: Aggregation
    threshold: float | None = None
    """Calibrated image threshold (None when the bank holds no calibration for these settings)."""
    patch_threshold: float | None = None
    is_novel: bool | None = None
    """score > threshold; None without a calibration."""

    def overlay(self, image: ImageLike, alpha: float = 0.5) -> Image.Image:
        """The image under a heat map of `scores`, with a colour bar marking the patch threshold."""
        return heatmap_overlay(image, self.scores, threshold=self.patch_threshold, alpha=alpha, label=self.method)


def transfer_labels(
    similarities: np.ndarray, neighbours: np.ndarray, soft_labels: np.ndarray, temperature: float
) -> np.ndarray:
    """(Q, K) class scores: softmax(sim / temperature)-weighted sum of the neighbours' soft labels.

    Rows of the result sum to 1 (soft labels do), so a score is directly a confidence.
    Neighbours an approximate index could not fill carry similarity -inf and weight 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = similarities.astype(np.float32) / np.float32(temperature)
    top = logits.max(axis=1, keepdims=True)
    logits -= np.where(np.isfinite(top), top, 0)  # rows without any hit get all-zero weights
    weights = np.exp(logits)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    gathered = soft_labels[neighbours].astype(np.float32, copy=False)  # (Q, k, K)
    return np.einsum("qk,qkc->qc", weights, gathered)


def segment_features(
    features: np.ndarray,
    bank: MemoryBank,
    output_size: tuple[int, int],
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    return_scores: bool = False,
    unknown: bool | float | NoveltyMethod = False,
    upsample: UpsampleMethod = "bilinear",
    guide: np.ndarray | None = None,
) -> SegmentationResult:
    """Segment from already computed (h, w, C) unit-norm query features.

    `unknown` labels novel pixels `UNKNOWN_LABEL` (mask value K, appended to `class_names`); their
    confidence and scores stay those of label transfer. It names the novelty method and threshold:
    a method ("knn" or "neco") uses that method's calibrated patch threshold, True the default
    method's (`DEFAULT_METHOD`, the k-NN baseline), and a float is a threshold on the default
    method's novelty. Unknown pixels are those of the novelty map as `novelty()` returns it
    (bilinear) whatever `upsample` is, so the two agree pixel for pixel.
    `upsample="guided"` needs `guide`, the query image at `output_size`.
    """
    if features.ndim != 3:
        raise ValueError(f"query features must be (h, w, C), got shape {features.shape}")
    upsampler = check_method(upsample)
    image = check_guide(guide, output_size) if upsampler == "guided" else None
    height, width, channels = features.shape
    rule = _unknown_rule(bank, unknown)
    sims, idx = bank.search(features.reshape(-1, channels), k)
    patch_scores = transfer_labels(sims, idx, bank.labels32, temperature)
    grid = np.ascontiguousarray(patch_scores.T).reshape(-1, height, width)
    if image is None:
        mask, confidence, scores = bilinear_argmax(grid, output_size, return_scores)
    else:
        mask, confidence, scores = guided_argmax(grid, image, return_scores)
    names = list(bank.class_names)
    if rule is not None:
        method, threshold = rule
        novel = upsample_bilinear(bank.patch_novelty(features, method)[None], output_size)[0] > threshold
        mask = np.where(novel, len(names), mask).astype(np.uint8 if len(names) < 256 else np.uint16)
        names.append(UNKNOWN_LABEL)
    return SegmentationResult(mask=mask, class_names=names, confidence=confidence, scores=scores, upsample=upsampler)


def _unknown_rule(bank: MemoryBank, unknown: bool | float | NoveltyMethod) -> tuple[NoveltyMethod, float] | None:
    """The novelty method and patch threshold `segment(..., unknown=...)` asks for, or None for no marking."""
    if unknown is False:
        return None
    if UNKNOWN_LABEL in bank.class_names:
        raise BankError(f"the bank already has a class named {UNKNOWN_LABEL!r}; it cannot also mark novel pixels")
    method: NoveltyMethod
    if unknown is True:
        method = DEFAULT_METHOD
    elif isinstance(unknown, str):
        if unknown not in METHODS:
            raise NoveltyError(f"unknown= takes True, a novelty threshold or a method among {METHODS}, got {unknown!r}")
        method = unknown
    else:
        return DEFAULT_METHOD, float(unknown)
    calibration = bank.require_novelty().calibration(method, None, DEFAULT_KNN_K)  # calibrations live there
    if calibration is None:
        raise NoveltyNotCalibratedError(
            f"segment(unknown={unknown!r}) needs the bank's {method} calibration: run calibrate_novelty(backend, "
            "held_out_images, bank) first, or pass unknown=<novelty threshold>"
        )
    return method, calibration.patch_threshold


def novelty_features(
    features: np.ndarray,
    bank: MemoryBank,
    output_size: tuple[int, int],
    *,
    method: NoveltyMethod = DEFAULT_METHOD,
    aggregation: Aggregation | None = None,
    k: int = DEFAULT_KNN_K,
) -> NoveltyResult:
    """Novelty of already computed (h, w, C) query features; see `novelty`."""
    if features.ndim != 3:
        raise ValueError(f"query features must be (h, w, C), got shape {features.shape}")
    calibration = bank.novelty.calibration(method, aggregation, k) if bank.novelty is not None else None
    if calibration is not None:
        aggregation = calibration.aggregation
    aggregation = check_aggregation(DEFAULT_AGGREGATION if aggregation is None else aggregation)
    patch = bank.patch_novelty(features, method, k)
    score = aggregate(patch, aggregation)
    return NoveltyResult(
        scores=upsample_bilinear(patch[None], output_size)[0],
        patch_scores=patch,
        score=score,
        method=method,
        aggregation=aggregation,
        threshold=calibration.image_threshold if calibration else None,
        patch_threshold=calibration.patch_threshold if calibration else None,
        is_novel=score > calibration.image_threshold if calibration else None,
    )


def is_saved_bank(support: Any) -> bool:
    """True for a path to a folder written by `MemoryBank.save`."""
    return isinstance(support, (str, Path)) and (Path(support) / MANIFEST).is_file()


def resolve_bank(
    backend: FeatureBackend,
    support: Any,
    size: SizeSpec | None = None,
    allow_size_mismatch: bool = False,
    **build_options: Any,
) -> MemoryBank:
    """A `MemoryBank` from a bank, a saved bank folder, a support folder or (image, mask) pairs.

    `size` is the query's size policy: a bank built here is built with it (without it, with the
    support images' own size), a given bank must have it (`neco.client.size_policy`).
    """
    if isinstance(support, MemoryBank):
        bank = support
    elif is_saved_bank(support):
        bank = MemoryBank.load(support, contract=backend.contract)
    elif isinstance(support, (str, Path)) and not Path(support).exists():
        raise BankError(
            f"memory bank {str(support)!r} does not exist: give a bank folder written by `neco bank build` "
            f"(or a folder with images/ and masks/ to build one on the fly)"
        )
    else:
        bank = build_for_query(backend, support, size, **build_options)
    check_contract(backend.contract, bank)
    check_query_size(size, bank.image_size, allow_size_mismatch)
    return bank


def check_contract(contract: ModelContract, bank: MemoryBank) -> None:
    """Refuse to compare features of one model with a bank built by another."""
    if not contract.compatible_with(bank.contract):
        raise BankContractError(
            f"the memory bank was built with another model than the features' "
            f"({'; '.join(bank.contract.differences(contract))}); rebuild the bank with this model"
        )


def segment(
    backend: FeatureBackend,
    image: ImageLike,
    support: Any,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    size: SizeSpec | None = None,
    return_scores: bool = False,
    class_names: Sequence[str] | None = None,
    unknown: bool | float | NoveltyMethod = False,
    allow_size_mismatch: bool = False,
    upsample: UpsampleMethod = DEFAULT_UPSAMPLE,
) -> SegmentationResult:
    """Segment `image` by label transfer from `support` (bank, bank folder, or pairs).

    The query is resized with the bank's image-size policy, and the mask comes back at the
    input image's own size. `size` builds a bank from pairs at that size (default: the support
    images' own); a built bank's size is refused unless `allow_size_mismatch=True`.
    `unknown`: see `segment_features`. `upsample`: "guided" (default) lets the image's own edges
    shape the mask, "bilinear" is the Hummingbird protocol's smooth upsampling (see docs/client.md
    for the measured difference).
    """
    bank = resolve_bank(backend, support, size, allow_size_mismatch, class_names=class_names)
    prepared, features = _query_features(backend, image, bank, size)
    result = segment_features(
        features,
        bank,
        prepared.original_size,
        k=k,
        temperature=temperature,
        return_scores=return_scores,
        unknown=unknown,
        upsample=upsample,
        guide=prepared.original if prepared.original is not None else prepared.array,
    )
    return replace(result, input_size=prepared.size, image=prepared)


def _query_features(
    backend: FeatureBackend, image: ImageLike, bank: MemoryBank, size: SizeSpec | None
) -> tuple[PreparedImage, np.ndarray]:
    """Resize a query by the bank's policy (or `size`) within the backend's limits; return its (h, w, C) features."""
    prepared = prepare_for(backend, image, size if size is not None else bank.image_size)
    return prepared, batch_features(backend, prepared.array[None])[0]


def novelty(
    backend: FeatureBackend,
    image: ImageLike,
    support: Any,
    *,
    method: NoveltyMethod = DEFAULT_METHOD,
    aggregation: Aggregation | None = None,
    k: int = DEFAULT_KNN_K,
    size: SizeSpec | None = None,
    allow_size_mismatch: bool = False,
) -> NoveltyResult:
    """How unlike the support set `image` is: a per-pixel map, an image score and a decision.

    `method` is "knn" (the default, `DEFAULT_METHOD`: the k-NN distance baseline, which measures
    best on the project's benchmark) or "neco"; the result states which. `support` is a bank, a
    saved bank folder, or pairs / a folder (then built on the fly, with its NECO subspace when
    NECO is asked for, but no calibration, hence no decision). `aggregation` defaults to the
    calibrated one ("mean" without calibration); `k` is the k-NN baseline's. `size` and
    `allow_size_mismatch`: as in `segment`.
    """
    options: dict[str, Any] = {"novelty": NoveltySpec()} if method == "neco" else {}
    bank = resolve_bank(backend, support, size, allow_size_mismatch, **options)
    prepared, features = _query_features(backend, image, bank, size)
    return novelty_features(features, bank, prepared.original_size, method=method, aggregation=aggregation, k=k)


def calibrate_novelty(
    backend: FeatureBackend,
    images: Sequence[ImageLike],
    bank: MemoryBank,
    *,
    methods: Sequence[NoveltyMethod] = ("neco", "knn"),
    aggregation: Aggregation = DEFAULT_AGGREGATION,
    acceptance: float = DEFAULT_ACCEPTANCE,
    k: int = DEFAULT_KNN_K,
) -> dict[str, Calibration]:
    """Calibrate decision thresholds on held-out in-distribution `images` (not in the bank).

    The calibrations are stored in the bank's novelty model (save the bank to keep them);
    the bank needs a fitted NECO subspace, which holds them.
    """
    check_contract(backend.contract, bank)
    bank.require_novelty()
    unknown_methods = [m for m in methods if m not in METHODS]
    if unknown_methods:
        raise NoveltyError(f"novelty methods must be among {METHODS}, got {unknown_methods}")
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for image in images:
        _, features = _query_features(backend, image, bank, None)
        for m in methods:
            maps[m].append(bank.patch_novelty(features, m, k))
    calibrations = {m: calibrate(maps[m], m, aggregation, acceptance, k) for m in methods}
    bank.add_calibrations(calibrations)
    return calibrations
