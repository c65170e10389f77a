"""Overclustering (unsupervised) segmentation: k-means on val patch features, matched to classes.

The NeCo paper's third VOC column (after Leopart). Two protocols (`--protocol`), both on the val
images resized to the square input size (images bilinear + antialias, masks PIL-nearest, as the
NeCo repository's torchvision transforms do), with K clusters (100, 300, 500 by default) mapped to
classes many-to-one (each to the class it overlaps most) and, with K = number of classes, one-to-one
by the Hungarian algorithm; the published mIoU (all classes, absent ones 0) is reported:

- `neco` (default): as the NeCo repository runs it (`experiments/overcluster/eval_overcluster.py`):
  features standardised (per-dimension mean 0, std 1) and reduced to 50 dimensions by PCA,
  faiss k-means with 100 iterations and 5 restarts (best objective), seeds 0-4 averaged; cluster
  grids and masks are both resized to 100 x 100 with torch's `nearest` and scored there.
- `raw`: this project's earlier protocol: raw features, 20 iterations, one seed, and each patch's
  cluster id repeated over its pixels at the input size. Quicker; its numbers are not the paper's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, PositiveInt

from neco.atomic import make_parent
from neco.contract import IGNORE_INDEX
from neco.evaluation.augment import SquareViews, resize_nearest_centre, resize_nearest_floor
from neco.evaluation.backends import iter_features
from neco.evaluation.config import EvalConfig
from neco.evaluation.datasets import load_dataset
from neco.evaluation.matching import MatchedIoU, matched_miou
from neco.evaluation.metrics import MetricError

if TYPE_CHECKING:
    from neco.client import FeatureBackend

DEFAULT_CLUSTERS: tuple[int, ...] = (100, 300, 500)
OverclusterProtocol = Literal["neco", "raw"]
STANDARDISE_CHUNK = 100_000
"""Rows per step of the in-place standardisation (bounds the float64 temporaries to ~300 MB)."""


@dataclass(frozen=True)
class ClusterRecipe:
    """How patch features become cluster ids, and at which size ids and masks are compared."""

    pca_dim: int | None
    """Standardise, then PCA to this many dimensions; None clusters the raw features."""
    niter: int
    nredo: int
    seeds: int
    """Seeds seed, seed + 1, ...; the reported mIoU is their mean."""
    score_size: int | None
    """Side of the square grid ids and masks are resized to (torch nearest); None: the mask's own size."""


RECIPES: dict[str, ClusterRecipe] = {
    "neco": ClusterRecipe(pca_dim=50, niter=100, nredo=5, seeds=5, score_size=100),
    "raw": ClusterRecipe(pca_dim=None, niter=20, nredo=1, seeds=1, score_size=None),
}
PROTOCOL_HELP: dict[str, str] = {
    "neco": "NeCo repository: standardise + PCA-50, k-means 100 iterations x 5 restarts, seeds averaged (5), "
    "scored at 100x100",
    "raw": "this project's quick protocol: raw features, k-means 20 iterations, one seed, scored at the input size",
}


class OverclusterConfig(EvalConfig):
    """Settings of `neco eval overcluster` (the val split only is used)."""

    protocol: OverclusterProtocol = Field("neco", description="neco (the NeCo repository's, default) | raw")
    clusters: list[PositiveInt] = Field(list(DEFAULT_CLUSTERS), min_length=1, description="K values (many-to-one)")
    hungarian: bool = Field(True, description="also K = number of classes with Hungarian matching")
    niter: int | None = Field(None, ge=1, description="k-means iterations; default the protocol's (neco 100, raw 20)")
    val_subset: int = Field(1, ge=1, description="use 1/N of the val split (quick checks only)")


@dataclass(frozen=True)
class SeedAveragedIoU:
    """One result per k-means seed; the headline numbers are their means (as the NeCo repository reports)."""

    runs: list[MatchedIoU]

    @property
    def miou(self) -> float:
        return float(np.mean([run.miou for run in self.runs]))

    @property
    def matching(self) -> str:
        return self.runs[0].matching

    def to_dict(self) -> dict[str, object]:
        per_class = np.mean([run.per_class for run in self.runs], axis=0)
        return {
            "miou": self.miou,
            "miou_per_seed": [run.miou for run in self.runs],
            "pixel_accuracy": float(np.mean([run.pixel_accuracy for run in self.runs])),
            "matching": self.matching,
            "per_class_iou": {name: float(v) for name, v in zip(self.runs[0].class_names, per_class)},
        }


def standardise_and_project(features: np.ndarray, pca_dim: int) -> np.ndarray:
    """(N, min(pca_dim, N, D)) float32: sklearn's StandardScaler, then faiss PCA, as the NeCo repository does.

    Standardises `features` (N, D) float32 IN PLACE, in chunks with float64 statistics, so VOC val at
    448 px (1.5 M x 384, 2.3 GB) needs no second copy; constant dimensions keep scale 1 (StandardScaler).
    """
    import faiss

    starts = range(0, features.shape[0], STANDARDISE_CHUNK)
    mean = sum(features[i : i + STANDARDISE_CHUNK].sum(axis=0, dtype=np.float64) for i in starts) / len(features)
    var = sum(np.square(features[i : i + STANDARDISE_CHUNK] - mean).sum(axis=0) for i in starts) / len(features)
    std = np.sqrt(var)
    scale = np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)
    for i in starts:
        features[i : i + STANDARDISE_CHUNK] = (features[i : i + STANDARDISE_CHUNK] - mean) / scale
    pca = faiss.PCAMatrix(features.shape[1], min(pca_dim, *features.shape))  # faiss: at most min(N, D) components
    pca.train(features)
    return pca.apply_py(features)


def kmeans_labels(features: np.ndarray, clusters: int, *, seed: int = 0, niter: int = 20, nredo: int = 1) -> np.ndarray:
    """(N,) cluster id of every row of `features` (N, D) from seeded faiss k-means (best of `nredo` runs)."""
    import faiss

    features = np.ascontiguousarray(features, dtype=np.float32)
    if clusters < 1 or clusters > features.shape[0]:
        raise MetricError(f"cannot make {clusters} clusters from {features.shape[0]} patches")
    kmeans = faiss.Kmeans(features.shape[1], clusters, niter=niter, nredo=nredo, seed=seed, verbose=False)
    kmeans.train(features)
    _, ids = kmeans.index.search(features, 1)
    return ids[:, 0].astype(np.int64)


def cluster_confusion(grids: Sequence[np.ndarray], masks: Sequence[np.ndarray], num_classes: int, clusters: int):
    """(C, K) pixel counts of (class, cluster); each (h, w) grid is repeated up to its (H, W) mask."""
    confusion = np.zeros((num_classes, clusters), dtype=np.int64)
    for grid, mask in zip(grids, masks):
        (h, w), (height, width) = grid.shape, mask.shape
        if height % h or width % w:
            raise MetricError(f"a {height}x{width} mask is not a whole multiple of a {h}x{w} cluster grid")
        pixels = np.repeat(np.repeat(grid, height // h, axis=0), width // w, axis=1)
        keep = mask != IGNORE_INDEX
        target = mask[keep].astype(np.int64)
        if target.size and target.max() >= num_classes:
            raise MetricError(f"mask holds label {int(target.max())} outside [0, {num_classes})")
        confusion += np.bincount(target * clusters + pixels[keep], minlength=num_classes * clusters).reshape(
            num_classes, clusters
        )
    return confusion


def overcluster(
    features: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    class_names: Sequence[str],
    clusters: Sequence[int] = DEFAULT_CLUSTERS,
    *,
    hungarian: bool = True,
    seed: int = 0,
    protocol: OverclusterProtocol = "neco",
    niter: int | None = None,
) -> dict[str, SeedAveragedIoU]:
    """Results keyed `k=<K>` (many-to-one) and `hungarian` (K = classes) for (h, w, D) features."""
    if not features or len(features) != len(masks):
        raise MetricError(f"{len(features)} feature maps for {len(masks)} masks")
    recipe = RECIPES[protocol]
    flat = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features]).astype(np.float32)  # a fresh copy
    if recipe.pca_dim is not None:
        flat = standardise_and_project(flat, recipe.pca_dim)
    offsets = np.cumsum([0] + [f.shape[0] * f.shape[1] for f in features])
    if recipe.score_size is not None:
        masks = [resize_nearest_floor(m, (recipe.score_size,) * 2) for m in masks]
    runs = [(f"k={k}", k, "many-to-one") for k in clusters]
    if hungarian:
        runs.append(("hungarian", len(class_names), "hungarian"))
    results = {}
    for key, k, matching in runs:
        per_seed = []
        for s in range(seed, seed + recipe.seeds):
            labels = kmeans_labels(flat, k, seed=s, niter=niter or recipe.niter, nredo=recipe.nredo)
            grids = [labels[a:b].reshape(f.shape[:2]) for a, b, f in zip(offsets[:-1], offsets[1:], features)]
            if recipe.score_size is not None:
                grids = [resize_nearest_floor(g, (recipe.score_size,) * 2) for g in grids]
            per_seed.append(matched_miou(cluster_confusion(grids, masks, len(class_names), k), class_names, matching))
        results[key] = SeedAveragedIoU(per_seed)
    return results


def run_overcluster(cfg: OverclusterConfig, backend: FeatureBackend | None = None) -> dict[str, object]:
    """`neco eval overcluster`: square val views -> features -> k-means per K (and seed) -> matched mIoU."""
    started = time.perf_counter()
    val = load_dataset(cfg.dataset, cfg.data_root, cfg.val_split, subset=cfg.val_subset, seed=cfg.seed)
    backend = backend if backend is not None else cfg.build_backend()
    size = backend.contract.floor_to_patch(cfg.input_size)
    views = SquareViews(val, size, mask_resize=resize_nearest_centre)
    # float16 halves the resident features (VOC val at 448 px: 1.5 M patches); k-means gets float32.
    pairs = [
        (features.astype(np.float16), mask)
        for features, mask in iter_features(backend, views, (size, size), batch_size=cfg.backend.batch_size, desc="val")
    ]
    results = overcluster(
        [f for f, _ in pairs], [m for _, m in pairs], val.class_names, cfg.clusters,
        hungarian=cfg.hungarian, seed=cfg.seed, protocol=cfg.protocol, niter=cfg.niter,
    )  # fmt: skip
    for key, result in results.items():
        head = f"overcluster[{cfg.protocol}, {key}, {result.matching}]"
        print(f"{head}: mIoU {100 * result.miou:.1f} (input {size}x{size} px)")
    report: dict[str, object] = {
        "evaluation": "overcluster",
        "protocol": cfg.protocol,
        "protocol_description": PROTOCOL_HELP[cfg.protocol],
        "dataset": cfg.dataset,
        "val_split": val.split,
        "num_val": len(val),
        "input_size": size,
        "contract": backend.contract.model_dump(),
        "config": cfg.model_dump(mode="json"),
        "results": {key: result.to_dict() for key, result in results.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    if cfg.out is not None:
        make_parent(cfg.out)
        cfg.out.write_text(json.dumps(report, indent=2))
    return report
