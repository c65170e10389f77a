"""`neco eval all`: one JSON + a Markdown table, rows = models, columns = dataset x protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neco.cli import main
from neco.evaluation.report import ReportConfig
from tests.evaluation.test_keypoints import _spair_tree


def test_eval_all(random_artefact: Path, scene_dataset: Path, tmp_path: Path) -> None:
    _spair_tree(tmp_path / "spair")
    out = tmp_path / "report"
    args = ["eval", "all", "--model", f"stock={random_artefact}", "--model", f"neco={random_artefact}"]
    args += ["--datasets", f"folder={scene_dataset}", f"spair={tmp_path / 'spair'}", "--device", "cpu"]
    args += ["--input-size", "56", "--clusters", "8", "--val-subset", "2", "--epochs", "1", "--out", str(out)]
    assert main(args) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert set(document["results"]) == {"stock", "neco"}
    hb = document["results"]["neco"]["folder"]["hummingbird"]
    assert set(hb["results"]) == {"hbird-eval", "strict"}
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == (
        "| model | folder overclustering K=8 | folder dense NN (hbird-eval) | folder dense NN (strict) "
        "| folder linear | SPair-71k PCK@0.1 | SPair-71k PCK@0.05 |"
    )
    stock = table[2].split("|")[2:-1]
    assert table[2].startswith("| stock |") and len(stock) == 6
    assert float(stock[1]) == pytest.approx(100 * hb["results"]["hbird-eval"]["miou"], abs=0.05)
    assert [c["protocol"] for c in document["columns"]][:3] == ["k=8", "hbird-eval", "strict"]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="NAME=ROOT"):
        ReportConfig(models=["a"], datasets=["/data/voc"])
    with pytest.raises(ValueError, match="unknown dataset"):
        ReportConfig(models=["a"], datasets=["pascal=/data"])
    with pytest.raises(ValueError, match="unique"):
        ReportConfig(models=["x/a.ckpt", "y/a.ckpt"], datasets=["voc=/data"])


def test_eval_all_row_of_a_dinov3_model(scene_dataset: Path, tmp_path: Path) -> None:
    """A DINOv3 artefact is a row like any other: the size rounds to its 16-px patches."""
    from neco.contract import ModelContract
    from neco.model import save_artefact
    from neco.model.testing import random_backbone

    arch = "vit_small_patch16_dinov3"
    artefact = save_artefact(random_backbone(arch), ModelContract.for_arch(arch), tmp_path / "dinov3", {"seed": 0})
    _spair_tree(tmp_path / "spair")
    out = tmp_path / "report"
    args = ["eval", "all", "--model", f"dinov3={artefact}", "--datasets", f"folder={scene_dataset}"]
    args += [f"spair={tmp_path / 'spair'}", "--device", "cpu", "--input-size", "70", "--clusters", "8"]
    args += ["--val-subset", "2", "--epochs", "1", "--out", str(out)]
    assert main(args) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    row = document["results"]["dinov3"]
    hbird = row["folder"]["hummingbird"]["results"]["hbird-eval"]
    assert 0.0 <= hbird["miou"] <= 1.0 and hbird["input_size"] == 64  # 70 rounded down to 4 x 16
    assert row["spair"]["keypoints"]["input_size"] == 64
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[2].startswith("| dinov3 |") and len(table[2].split("|")[2:-1]) == 6
