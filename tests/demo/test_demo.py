"""The end-to-end demo with a reduced config: every stage runs and leaves valid pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from neco.demo.pictures import GAP, TITLE_HEIGHT
from neco.demo.run import DemoConfig, main, run_demo

REPO = Path(__file__).resolve().parents[2]
REDUCED = {
    "train_config": REPO / "configs" / "train_smoke.yaml",
    "scenes": {"train": 6, "val": 3, "size": 112, "num_classes": 3, "family": "textures"},
    "train_overrides": [
        "optim.steps=2",
        "optim.batch_size=2",
        "data.num_workers=0",
        "runtime.checkpoint_every=2",
        "runtime.tensorboard=false",
        "runtime.progress=false",
    ],
    "input_size": 56,
    "pictures": 1,
    "export_parity": False,
}


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    summary = run_demo(DemoConfig(output_dir=tmp_path, **REDUCED))
    printed = capsys.readouterr().out
    for stage in range(1, 7):
        assert f"[{stage}/6]" in printed
    assert "mIoU" in printed and "ordering" in printed and "NeCo changed mIoU by" in printed
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["results"] == summary["results"]
    for label in ("starting weights", "after NeCo"):
        result = on_disk["results"][label]
        assert 0.0 <= result["miou"] <= 1.0 and result["upsample"] == "bilinear"
        assert 0.0 <= result["boundary_iou"] <= 1.0 and 0.0 <= result["guided"]["boundary_iou"] <= 1.0
        assert result["bank_patches"] == 6 * 4 * 4
        assert -1.0 <= result["ordering"]["mean_spearman"] <= 1.0 and result["ordering"]["images"] == 3
    assert (tmp_path / "train" / "artefact" / "backbone.safetensors").is_file()
    assert (tmp_path / "model_repository" / "neco_start" / "1" / "model.onnx").is_file()
    assert (tmp_path / "model_repository" / "neco_dinov2" / "1" / "model.onnx").is_file()
    pictures = sorted((tmp_path / "pictures").glob("*.png"))
    names = {p.name for p in pictures}
    assert {
        "query0_ground_truth.png",
        "query0_neco_start_overlay.png",
        "query0_neco_dinov2_overlay.png",
        "panel.png",
        "pca.png",
    } <= names
    for path in pictures:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
    # one query row: 5 columns (image | truth | start | after | after, guided) and 3 (image | PCA start | PCA after)
    with Image.open(tmp_path / "pictures" / "panel.png") as panel, Image.open(tmp_path / "pictures" / "pca.png") as pca:
        assert panel.width == 5 * 224 + 6 * GAP and panel.height > TITLE_HEIGHT + 224 + GAP
        assert pca.size == (3 * 224 + 4 * GAP, TITLE_HEIGHT + 224 + 2 * GAP)


def test_bad_config_is_reported(tmp_path: Path, capsys) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs" / "demo.yaml"), "scenes.train=0"]) == 2
    assert "scenes.train" in capsys.readouterr().err


def test_backbone_option_picks_the_encoder(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`--backbone` (python -m neco.demo and `neco demo`) sets `arch`; the default stays DINOv2-S/14 + registers."""
    import neco.demo.run as demo_run
    from neco.cli import main as neco_main

    seen: list[DemoConfig] = []
    monkeypatch.setattr(demo_run, "run_demo", seen.append)
    assert main(["--config", str(REPO / "configs" / "demo.yaml")]) == 0
    assert neco_main(["demo", "--backbone", "vit_small_patch16_dinov3"]) == 0
    assert [cfg.arch for cfg in seen] == ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"]
    assert main(["--backbone", "vit_small_patch16_dinov3", "input_size=120"]) == 2
    assert "16-px patches" in capsys.readouterr().err
    assert main(["--backbone", "vit_7b_patch16_dinov3"]) == 2
    assert "not supported" in capsys.readouterr().err
