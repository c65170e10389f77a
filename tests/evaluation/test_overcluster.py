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
    results = overcluster(features, masks, ["a", "b", "c"], clusters=[6], seed=0)
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
    assert report["input_size"] == 56 and "mIoU" in capsys.readouterr().out.split("(input 56x56 px)")[0]
