"""Novelty (out-of-distribution) scores of query patches against a memory bank; numpy only.

NECO (Ben Ammar et al., ICLR 2024, "NEural Collapse Based Out-of-distribution detection"):
standardise features with the in-distribution mean and standard deviation, fit PCA on the
standardised in-distribution features, and score a feature h by

    NECO(h) = ||P_d z|| / ||z||,   z = (h - mean) / std,

with P_d the projection onto the top-d principal axes. In-distribution features keep most of
their norm inside that subspace (NECO near 1). NECO was defined on a classifier's penultimate
features; here it is applied to the dense patch features of an encoder without a classifier
head, so the paper's optional max-logit factor has no counterpart and is not used.

Every map and score this module returns is a *novelty*: higher means more novel, so one
threshold convention ("above = novel") serves both methods:

- `neco`: novelty = 1 - NECO(h), in [0, 1];
- `knn`:  novelty = 1 - cosine similarity of the k-th nearest bank patch (the deep k-NN
  baseline of Sun et al., ICML 2022, on unit-norm features), in [0, 2].

The default is `knn` (`DEFAULT_METHOD`). On the project's benchmark (generated scenes, where
unseen classes are mixtures of seen colours) NECO ranks unseen-class patches as *more*
in-distribution than seen ones. The code computes NECO as defined; the ratio is what fails there:
those patches lie far from the in-distribution mean but inside the span of its principal axes, so
most of their (larger) norm stays in the subspace, and a ratio divides the distance away. A local
test (k-NN distance) keeps it. docs/novelty.md has the measurement.

An image-level score aggregates its patch novelties (mean or a quantile). A `Calibration`
holds the thresholds that accept a requested share of held-out in-distribution images (and
patches). The fitted `NoveltyModel` is stored with the bank (see `save` / `from_entry`).

This module knows arrays and models, not `MemoryBank`: a bank fits, stores and applies its own
model (`MemoryBank.fit_novelty`, `add_calibrations`, `patch_novelty`), so the dependency runs
one way (bank -> novelty).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from neco.client.errors import BankCorruptError, NoveltyError, NoveltyNotCalibratedError

NoveltyMethod = Literal["neco", "knn"]
METHODS: tuple[str, ...] = ("neco", "knn")
DEFAULT_METHOD: NoveltyMethod = "knn"
"""What `novelty`, `bank.patch_novelty` and `segment(..., unknown=True)` use unless told: the k-NN
baseline, which measures best on the project's benchmark at patch and image level on both OOD
sets (benchmarks/results/novelty_cpu.json; NECO inverts on unseen classes there, see docs/novelty.md)."""
Aggregation = Union[Literal["mean"], float]
"""Image-level score: "mean" of the patch novelties, or a quantile q in [0, 1] of them."""

DEFAULT_VARIANCE = 0.9
"""Share of the standardised variance the NECO subspace keeps when `dim` is not given."""
DEFAULT_ACCEPTANCE = 0.95
"""Share of held-out in-distribution images (and patches) a calibrated threshold accepts."""
DEFAULT_AGGREGATION: Aggregation = "mean"
DEFAULT_KNN_K = 10
"""k of the k-NN baseline (the k-th neighbour's distance); below the retrieval k of 30 because
a small support set holds few patches of each appearance (see docs/novelty.md)."""
NOVELTY_FILES = {"mean": "novelty_mean.npy", "scale": "novelty_scale.npy", "components": "novelty_components.npy"}
_CHUNK = 65536  # rows per pass when fitting: a 1M-patch fp16 bank is never copied to float64 at once


class NoveltySpec(BaseModel):
    """How to fit the NECO subspace: a fixed `dim`, or the smallest d keeping `variance`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int | None = Field(default=None, ge=1, description="number of principal components d")
    variance: float = Field(default=DEFAULT_VARIANCE, gt=0.0, le=1.0, description="explained-variance threshold")


class Calibration(BaseModel):
    """Thresholds that accept `acceptance` of held-out in-distribution images and patches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: NoveltyMethod
    aggregation: Aggregation
    k: int | None = Field(default=None, description="neighbours of the knn method; None for neco")
    acceptance: float = Field(gt=0.0, lt=1.0)
    image_threshold: float
    """An image whose aggregated novelty exceeds this is declared novel."""
    patch_threshold: float
    """A patch (or pixel of the upsampled map) whose novelty exceeds this is novel."""
    num_images: int
    num_patches: int


class NoveltyEntry(BaseModel):
    """The bank manifest's "novelty" entry: the fit's settings and where its arrays are."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    method: Literal["neco"] = "neco"
    spec: NoveltySpec
    dim: int = Field(ge=1)
    explained: float
    fit_patches: NonNegativeInt
    files: dict[Literal["mean", "scale", "components"], str]
    calibrations: dict[str, Calibration] = {}


def check_aggregation(aggregation: Any) -> Aggregation:
    """Validate an aggregation ("mean" or a quantile in [0, 1]) and return it normalised."""
    if aggregation == "mean":
        return "mean"
    if isinstance(aggregation, (int, float)) and not isinstance(aggregation, bool) and 0.0 <= aggregation <= 1.0:
        return float(aggregation)
    raise NoveltyError(f"aggregation must be 'mean' or a quantile in [0, 1], got {aggregation!r}")


def aggregate(patch_scores: np.ndarray, aggregation: Aggregation) -> float:
    """The image-level novelty of a patch-novelty map."""
    aggregation = check_aggregation(aggregation)
    values = np.asarray(patch_scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise NoveltyError("cannot aggregate an empty novelty map")
    return float(values.mean() if aggregation == "mean" else np.quantile(values, aggregation))


class NoveltyModel:
    """The fitted NECO subspace of a bank's features, plus the calibrations made with it."""

    def __init__(
        self,
        mean: np.ndarray,
        scale: np.ndarray,
        components: np.ndarray,
        spec: NoveltySpec,
        *,
        num_patches: int,
        explained: float,
        calibrations: dict[str, Calibration] | None = None,
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.components = np.asarray(components, dtype=np.float32)
        self.spec = spec
        self.num_patches = num_patches
        self.explained = explained
        self.calibrations: dict[str, Calibration] = dict(calibrations or {})

    @property
    def dim(self) -> int:
        """d, the number of principal components kept."""
        return int(self.components.shape[0])

    def __repr__(self) -> str:
        return (
            f"NoveltyModel(d={self.dim} of {self.mean.shape[0]}, explained {self.explained:.3f}, "
            f"fit on {self.num_patches} patches, calibrated: {sorted(self.calibrations) or 'no'})"
        )

    # --- fitting ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, features: np.ndarray, spec: NoveltySpec | None = None) -> NoveltyModel:
        """Standardise `features` (N, C) and keep the top-d principal axes of the result.

        d is `spec.dim`, or the smallest d whose components explain `spec.variance` of the
        standardised variance. N centred points span at most N - 1 directions, so a fixed d
        needs N > d patches.
        """
        spec = spec or NoveltySpec()
        if features.ndim != 2 or features.shape[0] == 0:
            raise NoveltyError(f"NECO needs (N, C) in-distribution features, got shape {features.shape}")
        count, channels = features.shape
        if spec.dim is not None and spec.dim > channels:
            raise NoveltyError(f"NECO dim d={spec.dim} exceeds the feature width {channels}")
        needed = (spec.dim or 1) + 1
        if count < needed:
            raise NoveltyError(
                f"the bank holds {count} patches; fitting {spec.dim or 1} principal component(s) needs at least {needed}"
            )
        mean = np.zeros(channels, dtype=np.float64)
        for start in range(0, count, _CHUNK):
            mean += features[start : start + _CHUNK].astype(np.float64).sum(axis=0)
        mean /= count
        scatter = np.zeros((channels, channels), dtype=np.float64)
        for start in range(0, count, _CHUNK):
            block = features[start : start + _CHUNK].astype(np.float64) - mean
            scatter += block.T @ block
        std = np.sqrt(np.diag(scatter) / count)
        scale = np.where(std > 1e-8 * max(float(std.max()), 1e-30), std, 1.0)  # constant channels stay as they are
        covariance = scatter / count / np.outer(scale, scale)  # of the standardised features
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues, eigenvectors = np.clip(eigenvalues[::-1], 0.0, None), eigenvectors[:, ::-1]
        ratio = np.cumsum(eigenvalues) / max(float(eigenvalues.sum()), 1e-300)
        rank = min(count - 1, channels)
        dim = spec.dim if spec.dim is not None else min(int(np.searchsorted(ratio, spec.variance - 1e-12)) + 1, rank)
        return cls(mean, scale, eigenvectors[:, :dim].T, spec, num_patches=count, explained=float(ratio[dim - 1]))

    def with_calibrations(self, calibrations: Mapping[str, Calibration]) -> NoveltyModel:
        """This fit with `calibrations` added (replacing those of the same method)."""
        model = copy.copy(self)
        model.calibrations = {**self.calibrations, **calibrations}
        return model

    def calibration(self, method: NoveltyMethod, aggregation: Aggregation | None, k: int) -> Calibration | None:
        """The calibration for `method`, checked against the requested settings (None if there is none).

        A threshold only means something for the aggregation (and k) it was computed with, so a
        mismatch is an error rather than a silently wrong decision.
        """
        calibration = self.calibrations.get(method)
        if calibration is None:
            return None
        wanted = calibration.aggregation if aggregation is None else check_aggregation(aggregation)
        if wanted != calibration.aggregation or (method == "knn" and calibration.k != k):
            raise NoveltyNotCalibratedError(
                f"the bank's {method} calibration is for aggregation {calibration.aggregation!r}"
                f"{f', k={calibration.k}' if method == 'knn' else ''}; asked for {wanted!r}"
                f"{f', k={k}' if method == 'knn' else ''}: recalibrate, or use the calibrated settings"
            )
        return calibration

    # --- scoring ----------------------------------------------------------------------------
    def neco(self, features: np.ndarray) -> np.ndarray:
        """NECO(h) = ||P_d z|| / ||z|| for features (..., C); 1 for a feature equal to the mean."""
        flat = np.asarray(features, dtype=np.float32)
        if flat.shape[-1] != self.mean.shape[0]:
            raise NoveltyError(
                f"features of width {flat.shape[-1]} given to a NECO model of width {self.mean.shape[0]}"
            )
        z = (flat.reshape(-1, flat.shape[-1]) - self.mean) / self.scale
        full = np.linalg.norm(z, axis=1)
        kept = np.linalg.norm(z @ self.components.T, axis=1)
        ratio = np.where(full > 0, kept / np.maximum(full, np.finfo(np.float32).tiny), 1.0)
        return np.clip(ratio, 0.0, 1.0).astype(np.float32).reshape(flat.shape[:-1])

    def novelty(self, features: np.ndarray) -> np.ndarray:
        """1 - NECO: 0 inside the in-distribution subspace, 1 orthogonal to it."""
        return 1.0 - self.neco(features)

    # --- persistence (called by bank_io, which checksums the files) -------------------------
    def save(self, folder: Path) -> NoveltyEntry:
        """Write the arrays into `folder` (no pickle) and return the bank manifest's entry."""
        for key, name in NOVELTY_FILES.items():
            np.save(folder / name, np.ascontiguousarray(getattr(self, key)), allow_pickle=False)
        return NoveltyEntry(
            spec=self.spec,
            dim=self.dim,
            explained=self.explained,
            fit_patches=self.num_patches,
            files=NOVELTY_FILES,
            calibrations=self.calibrations,
        )

    @classmethod
    def from_entry(cls, entry: NoveltyEntry, read: Callable[[str], np.ndarray], width: int, where: str) -> NoveltyModel:
        """Rebuild a model from its (validated) manifest entry; `read(file)` returns a verified array."""
        if entry.files != NOVELTY_FILES:  # fixed names: a manifest never points outside the bank folder
            raise BankCorruptError(f"{where}: the novelty entry names files {entry.files}, expected {NOVELTY_FILES}")
        arrays = {key: read(entry.files[key]) for key in NOVELTY_FILES}
        shapes = tuple(arrays[key].shape for key in NOVELTY_FILES)
        if shapes != ((width,), (width,), (entry.dim, width)):
            raise BankCorruptError(f"{where}: novelty arrays have shapes {shapes}, features are {width} wide")
        return cls(
            arrays["mean"],
            arrays["scale"],
            arrays["components"],
            entry.spec,
            num_patches=entry.fit_patches,
            explained=entry.explained,
            calibrations=entry.calibrations,
        )


def knn_novelty(similarities: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of the last (k-th) neighbour; unfilled neighbours count as -1."""
    sims = np.asarray(similarities, dtype=np.float32)
    return 1.0 - np.where(np.isfinite(sims[:, -1]), sims[:, -1], -1.0)


def calibrate(
    patch_maps: Sequence[np.ndarray],
    method: NoveltyMethod,
    aggregation: Aggregation = DEFAULT_AGGREGATION,
    acceptance: float = DEFAULT_ACCEPTANCE,
    k: int | None = None,
) -> Calibration:
    """Thresholds from the patch-novelty maps of held-out in-distribution images.

    The image threshold is the smallest value that accepts (novelty <= threshold) at least
    `acceptance` of the images; the patch threshold does the same over all their patches.
    """
    if not 0.0 < acceptance < 1.0:
        raise NoveltyError(f"acceptance must be in (0, 1), got {acceptance}")
    if len(patch_maps) == 0:
        raise NoveltyError("calibration needs at least one held-out in-distribution image")
    aggregation = check_aggregation(aggregation)
    image_scores = np.array([aggregate(m, aggregation) for m in patch_maps])
    patches = np.concatenate([np.asarray(m, dtype=np.float64).reshape(-1) for m in patch_maps])
    return Calibration(
        method=method,
        aggregation=aggregation,
        k=k if method == "knn" else None,
        acceptance=acceptance,
        image_threshold=float(np.quantile(image_scores, acceptance, method="inverted_cdf")),
        patch_threshold=float(np.quantile(patches, acceptance, method="inverted_cdf")),
        num_images=len(patch_maps),
        num_patches=int(patches.size),
    )
