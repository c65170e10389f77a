"""Linear probe: learns on generated scenes with a frozen random-init encoder; CLI + report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neco.cli import main
from neco.evaluation.backends import TorchBackend
from neco.evaluation.datasets import load_dataset
from neco.evaluation.linear import LinearConfig, evaluate_head, extract_features, run_linear, train_head
from neco.evaluation.metrics import mean_iou


def test_head_learns_beyond_chance(random_artefact: Path, scene_dataset: Path) -> None:
    backend = TorchBackend(random_artefact, device="cpu")
    cfg = LinearConfig(data_root=scene_dataset, input_size=56, epochs=10, batch_size=4)
    train_set = load_dataset("folder", scene_dataset, "train")
    val_set = load_dataset("folder", scene_dataset, "val")
    train = extract_features(backend, train_set, cfg.size, "train")
    val = extract_features(backend, val_set, cfg.size, "val")
    assert train[0][0].shape == (4, 4, 384) and train[0][1].shape == (112, 112)
    untrained = torch.nn.Conv2d(384, 4, 1).eval()
    head = train_head(train, 4, cfg, "cpu")
    # Logits are upsampled to the full mask size before the argmax.
    learned_train = evaluate_head(head, train, train_set.class_names, "cpu")
    learned = evaluate_head(head, val, val_set.class_names, "cpu")
    constant = mean_iou([np.zeros_like(m) for _, m in val], [m for _, m in val], val_set.class_names)
    assert learned.miou > constant.miou
    assert learned_train.miou > evaluate_head(untrained, train, train_set.class_names, "cpu").miou


def test_cli_writes_report(random_artefact: Path, scene_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    code = main(
        [
            "eval",
            "linear",
            "--dataset",
            "folder",
            "--data-root",
            str(scene_dataset),
            "--model",
            str(random_artefact),
            "--device",
            "cpu",
            "--input-size",
            "56",
            "--epochs",
            "1",
            "--train-subset",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert (
        report["protocol"] == "linear"
        and 0.0 <= report["miou"] <= 1.0
        and report["num_val"] == 6
        and report["num_train"] == 3
    )


def test_config_rejects_bad_values(scene_dataset: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        LinearConfig(data_root=scene_dataset, epochs=0)
    with pytest.raises(ValueError, match="CUDA is not available"):
        if not torch.cuda.is_available():
            run_linear(LinearConfig(data_root=scene_dataset, device="cuda"), backend=None)  # type: ignore[arg-type]
        else:
            raise ValueError("CUDA is not available (skipped check: CUDA present)")
