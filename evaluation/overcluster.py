"""Overclustering (unsupervised) segmentation: k-means on val patch features, matched to classes.

The NeCo paper's third VOC column (after Leopart): the val images are resized to the square
input size, k-means (`faiss.Kmeans`, fixed seed) runs on all their patch features with K clusters
(100, 300, 500 by default), each patch's cluster id is upsampled (nearest, i.e. repeated over the
patch's pixels) to the square mask, and one confusion matrix (255 ignored) is built over the split.
Clusters are mapped to classes many-to-one (each to the class it overlaps most), and with
K = number of classes also one-to-one by the Hungarian algorithm; the published mIoU (all classes,
absent ones 0) is reported for each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field, PositiveInt

from neco.atomic import make_parent
from neco.contract import IGNORE_INDEX
from neco.evaluation.augment import SquareViews
from neco.evaluation.backends import iter_features
from neco.evaluation.config import EvalConfig
from neco.evaluation.datasets import load_dataset
from neco.evaluation.matching import MatchedIoU, matched_miou
from neco.evaluation.metrics import MetricError

if TYPE_CHECKING:
    from neco.client import FeatureBackend

DEFAULT_CLUSTERS: tuple[int, ...] = (100, 300, 500)


class OverclusterConfig(EvalConfig):
    """Settings of `neco eval overcluster` (the val split only is used)."""

    clusters: list[PositiveInt] = Field(list(DEFAULT_CLUSTERS), min_length=1, description="K values (many-to-one)")
    hungarian: bool = Field(True, description="also K = number of classes with Hungarian matching")
    niter: int = Field(20, ge=1, description="k-means iterations")
    val_subset: int = Field(1, ge=1, description="use 1/N of the val split (quick checks only)")


def kmeans_labels(features: np.ndarray, clusters: int, *, seed: int = 0, niter: int = 20) -> np.ndarray:
    """(N,) cluster id of every row of `features` (N, D) from seeded faiss k-means."""
    import faiss

    features = np.ascontiguousarray(features, dtype=np.float32)
    if clusters < 1 or clusters > features.shape[0]:
        raise MetricError(f"cannot make {clusters} clusters from {features.shape[0]} patches")
    kmeans = faiss.Kmeans(features.shape[1], clusters, niter=niter, seed=seed, verbose=False)
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
    niter: int = 20,
) -> dict[str, MatchedIoU]:
    """Results keyed `k=<K>` (many-to-one) and `hungarian` (K = classes) for (h, w, D) features."""
    if not features or len(features) != len(masks):
        raise MetricError(f"{len(features)} feature maps for {len(masks)} masks")
    flat = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features]).astype(np.float32)
    offsets = np.cumsum([0] + [f.shape[0] * f.shape[1] for f in features])
    runs = [(f"k={k}", k, "many-to-one") for k in clusters]
    if hungarian:
        runs.append(("hungarian", len(class_names), "hungarian"))
    results = {}
    for key, k, matching in runs:
        labels = kmeans_labels(flat, k, seed=seed, niter=niter)
        grids = [labels[a:b].reshape(f.shape[:2]) for a, b, f in zip(offsets[:-1], offsets[1:], features)]
        results[key] = matched_miou(cluster_confusion(grids, masks, len(class_names), k), class_names, matching)
    return results


def run_overcluster(cfg: OverclusterConfig, backend: FeatureBackend | None = None) -> dict[str, object]:
    """`neco eval overcluster`: square val views -> features -> k-means per K -> matched mIoU."""
    started = time.perf_counter()
    val = load_dataset(cfg.dataset, cfg.data_root, cfg.val_split, subset=cfg.val_subset, seed=cfg.seed)
    backend = backend if backend is not None else cfg.build_backend()
    size = cfg.input_size - cfg.input_size % backend.contract.patch_size
    # float16 halves the resident features (VOC val at 448 px: 1.5 M patches); k-means gets float32.
    pairs = [
        (features.astype(np.float16), mask)
        for features, mask in iter_features(
            backend, SquareViews(val, size), (size, size), batch_size=cfg.backend.batch_size, desc="val"
        )
    ]
    results = overcluster(
        [f for f, _ in pairs], [m for _, m in pairs], val.class_names, cfg.clusters,
        hungarian=cfg.hungarian, seed=cfg.seed, niter=cfg.niter,
    )  # fmt: skip
    for key, result in results.items():
        print(f"overcluster[{key}, {result.matching}]: mIoU {100 * result.miou:.1f} (input {size}x{size} px)")
    report: dict[str, object] = {
        "evaluation": "overcluster",
        "protocol": "overcluster",
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
