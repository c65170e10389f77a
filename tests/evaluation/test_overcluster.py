"""Overclustering: label matching on hand-computable confusions, k-means on separable features, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neco.cli import main
from neco.evaluation.matching import hungarian_mapping, many_to_one_mapping, matched_miou
from neco.evaluation.metrics import MetricError
from neco.evaluation.overcluster import cluster_confusion, kmeans_labels, overcluster


def test_many_to_one_by_hand() -> None:
    # 3 clusters, 2 classes: clusters 0 and 2 mostly class 0, cluster 1 class 1.
    confusion = np.array([[5, 0, 3], [0, 4, 1]])
    np.testing.assert_array_equal(many_to_one_mapping(confusion), [0, 1, 0])
    result = matched_miou(confusion, ["a", "b"], "many-to-one")
    # Remapped: [[8, 0], [1, 4]] -> IoU a = 8 / 9, b = 4 / 5.
    np.testing.assert_allclose(result.per_class, [8 / 9, 4 / 5])


def test_hungarian_by_hand() -> None:
    # Labels are swapped: label 0 covers class 1 and vice versa.
    confusion = np.array([[0, 6], [5, 1]])
    np.testing.assert_array_equal(hungarian_mapping(confusion), [1, 0])
    np.testing.assert_allclose(matched_miou(confusion, ["a", "b"]).per_class, [6 / 7, 5 / 6])
    # Already-aligned labels stay put.
    confusion = np.array([[50, 40, 0], [0, 5, 0], [0, 0, 5]])
    np.testing.assert_array_equal(hungarian_mapping(confusion), [0, 1, 2])
    with pytest.raises(MetricError, match="as many labels"):
        hungarian_mapping(np.ones((2, 3)))


def test_cluster_confusion_by_hand() -> None:
    grid = np.array([[0, 1], [2, 2]])
    mask = np.array([[0, 0, 1, 255], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=np.uint8)
    expected = np.array([[4, 0, 4], [0, 3, 4]])
    np.testing.assert_array_equal(cluster_confusion([grid], [mask], 2, 3), expected)


def test_kmeans_recovers_separable_classes() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 5
    cells = [rng.integers(0, 3, (4, 4)) for _ in range(6)]
    features = [(centres[c] + 0.05 * rng.normal(size=(4, 4, 16))).astype(np.float32) for c in cells]
    masks = [np.repeat(np.repeat(c, 2, 0), 2, 1).astype(np.uint8) for c in cells]
    results = overcluster(features, masks, ["a", "b", "c"], clusters=[6], seed=0, protocol="raw")
    assert results["k=6"].miou == pytest.approx(1.0) and results["hungarian"].miou == pytest.approx(1.0)
    labels = kmeans_labels(np.concatenate([f.reshape(-1, 16) for f in features]), 6, seed=0)
    np.testing.assert_array_equal(
        labels, kmeans_labels(np.concatenate([f.reshape(-1, 16) for f in features]), 6, seed=0)
    )
    with pytest.raises(MetricError, match="cannot make"):
        kmeans_labels(np.zeros((4, 16), dtype=np.float32), 5)


def test_cli(random_artefact: Path, scene_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "oc.json"
    args = ["eval", "overcluster", "--data-root", str(scene_dataset), "--model", str(random_artefact)]
    args += ["--device", "cpu", "--input-size", "56", "--clusters", "5,10", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"k=5", "k=10", "hungarian"}
    assert all(0.0 <= r["miou"] <= 1.0 for r in report["results"].values())
    assert report["results"]["k=10"]["matching"] == "many-to-one"
    assert report["protocol"] == "neco" and len(report["results"]["k=10"]["miou_per_seed"]) == 5
    assert report["input_size"] == 56 and "mIoU" in capsys.readouterr().out.split("(input 56x56 px)")[0]


def _reference_overcluster(features, masks, num_classes: int, k: int, seeds: int = 5) -> float:
    """The NeCo repository's recipe re-derived from its facts with numpy, faiss's Kmeans and torch.

    StandardScaler (ddof 0), PCA to 50 dims by eigen-decomposition, Kmeans(niter=100, nredo=5) per
    seed, cluster grids and masks to 100x100 by torch `nearest`, 255 dropped, then per seed: clusters
    greedily to the class of best precision (k > classes) or Hungarian on 1 - IoU (k == classes), IoU
    of every class (absent -> 0) averaged; seeds averaged.
    """
    import faiss
    import torch
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment

    x = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features]).astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    x = np.ascontiguousarray(x @ eigvecs[:, np.argsort(eigvals)[::-1][:50]], dtype=np.float32)

    def to_100(grid: np.ndarray) -> np.ndarray:
        return F.interpolate(torch.from_numpy(grid[None, None].astype(np.float32)), size=(100, 100))[0, 0].numpy()

    gt = np.concatenate([to_100(m).ravel() for m in masks]).astype(int)
    keep = gt != 255
    scores = []
    for seed in range(seeds):
        kmeans = faiss.Kmeans(50, k, niter=100, nredo=5, seed=seed, verbose=False)
        kmeans.train(x)
        ids = kmeans.index.search(x, 1)[1][:, 0]
        grids, start = [], 0
        for f in features:
            grids.append(to_100(ids[start : start + f.shape[0] * f.shape[1]].reshape(f.shape[:2])).ravel())
            start += f.shape[0] * f.shape[1]
        pred, target = np.concatenate(grids).astype(int)[keep], gt[keep]
        remapped = np.zeros_like(pred)
        if k == num_classes:
            iou = np.array([[np.sum((target == c) & (pred == p)) / max(np.sum((target == c) | (pred == p)), 1e-8)
                             for p in range(k)] for c in range(num_classes)])  # fmt: skip
            for c, p in zip(*linear_sum_assignment(1 - iou)):
                remapped[pred == p] = c
        else:
            for p in range(k):
                best, best_precision = 0, -1.0
                for c in range(num_classes):
                    precision = np.sum((target == c) & (pred == p)) / max(np.sum(pred == p), 1e-8)
                    if precision > best_precision:
                        best, best_precision = c, precision
                remapped[pred == p] = best
        ious = [
            np.sum((target == c) & (remapped == c)) / max(np.sum((target == c) | (remapped == c)), 1e-8)
            for c in range(num_classes)
        ]
        scores.append(np.mean(ious))
    return float(np.mean(scores))


def test_neco_protocol_equals_the_repository_recipe() -> None:
    # 12 images of 8x8 patches (64-dim features, so PCA-50 reduces), 112x112 masks with 255 bands;
    # class "d" never appears, and class regions do not follow patch borders exactly.
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 2.0, (3, 64))
    features, masks = [], []
    for _ in range(12):
        cells = rng.integers(0, 3, (8, 8))
        features.append((centres[cells] + rng.normal(0, 1.0, (8, 8, 64))).astype(np.float32))
        mask = np.repeat(np.repeat(cells, 14, 0), 14, 1).astype(np.uint8)
        mask[rng.integers(0, 100) :][:5] = 255
        mask[:, 30:33] = 255
        mask[rng.integers(0, 112, 40), rng.integers(0, 112, 40)] = rng.integers(0, 3, 40)
        masks.append(mask)
    names = ["a", "b", "c", "d"]
    results = overcluster(features, masks, names, clusters=[10], protocol="neco")
    assert len(results["k=10"].runs) == 5 and results["k=10"].to_dict()["per_class_iou"]["d"] == 0.0
    assert results["k=10"].miou == pytest.approx(_reference_overcluster(features, masks, 4, 10), abs=1e-12)
    assert results["hungarian"].miou == pytest.approx(_reference_overcluster(features, masks, 4, 4), abs=1e-12)
    raw = overcluster(features, masks, names, clusters=[10], protocol="raw")
    assert len(raw["k=10"].runs) == 1 and raw["k=10"].miou != results["k=10"].miou
