"""End-to-end runs on a 2-block ViT-S: learning, bit-identical resume, DDP, CLI, checkpoints."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from neco.contract import ARTEFACT_WEIGHTS
from neco.model import load_backbone, load_state_into, patch_features, read_artefact_contract
from neco.training.checkpoint import list_checkpoints, load_checkpoint
from neco.training.config import load_train_config
from neco.training.data import collate
from neco.training.run import build_dataset, train
from neco.training.trainer import Trainer
from tests.training.tiny import one_thread, tiny_backbone, tiny_config, use_tiny_backbone  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tiny_run_lowers_its_loss_on_a_fixed_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_tiny_backbone(monkeypatch)
    cfg = tiny_config(
        tmp_path,
        model={"drop_path_rate": 0.0},
        optim={"steps": 30, "backbone_lr": 1e-3, "head_lr": 3e-3, "warmup_steps": 0, "clip_grad": None},
        method={"queue_length": 4096},
    )  # never fills: references from the batch
    torch.manual_seed(0)
    dataset = build_dataset(cfg)
    batch = collate([dataset[(i, 100 + i)] for i in range(2)])
    trainer = Trainer(cfg, 1000, torch.device("cpu"))  # long horizon: lr stays ~constant
    losses = [trainer.train_step([batch])["loss"] for _ in range(30)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accumulation: int) -> None:
    use_tiny_backbone(monkeypatch)
    straight = tiny_config(tmp_path / "a", optim={"accumulation": accumulation})
    train(straight)
    split = tiny_config(tmp_path / "b", optim={"accumulation": accumulation})
    train(split, stop_at=2)  # same 4-step schedule, interrupted after 2 steps
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000002.pt"]
    train(split, resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000004.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000004.pt")
    for key in ("student", "teacher"):
        _states_equal(a[key], b[key])
    assert torch.equal(a["queue"]["buffer"], b["queue"]["buffer"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_training_checkpoint_loads_as_a_backbone(tmp_path: Path) -> None:
    """Full-depth ViT-S (no training steps needed): the student backbone loads back exactly."""
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg, 4, torch.device("cpu"))
    from neco.training.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "ckpt", 0, trainer.state_dict())
    model, contract = load_backbone(path)
    assert contract.training_hash and contract.arch == cfg.model.arch
    images = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(
            patch_features(model, images)[0], patch_features(trainer.model.backbone.eval(), images)[0]
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from neco.training import trainer as trainer_module
    from tests.training.tiny import tiny_backbone

    trainer_module.create_backbone = tiny_backbone  # same swap as use_tiny_backbone, in the child
    captured: dict = {}
    original = trainer_module.Trainer.state_dict

    def capture(self):  # type: ignore[no-untyped-def]
        state = original(self)
        captured.update(teacher=state["teacher"], queue=state["queue"], student=state["student"])
        return state

    trainer_module.Trainer.state_dict = capture  # type: ignore[method-assign]
    train(tiny_config(Path(out), optim={"steps": 2}, runtime={"checkpoint_every": 2}))
    torch.save(captured, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_gloo_two_processes_stay_in_sync(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    _states_equal(r0["student"], r1["student"])
    _states_equal(r0["teacher"], r1["teacher"])
    assert torch.equal(r0["queue"]["buffer"], r1["queue"]["buffer"])
    assert r0["queue"]["count"][0] == 2 * 2 * 2 * 2  # steps x ranks x images x patches per image
    assert (tmp_path / "artefact" / ARTEFACT_WEIGHTS).is_file()


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    result = subprocess.run(
        [sys.executable, "training/run.py", "--config", "configs/train_smoke.yaml", "optim.batch_size=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "optim.batch_size" in result.stderr, result.stderr
    from neco.cli import main

    assert main(["train", "--config", "configs/train_smoke.yaml", "crops.local_size=30"]) == 2
    assert "not a multiple of the patch size" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "arch"),
    [("train_smoke.yaml", "vit_small_patch14_reg4_dinov2"), ("train_smoke_dinov3.yaml", "vit_small_patch16_dinov3")],
)
def test_smoke_config_runs_from_the_command_line(tmp_path: Path, config: str, arch: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "training/run.py",
            "--config",
            f"configs/{config}",
            f"output_dir={tmp_path}",
            "optim.steps=2",
            "runtime.progress=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model, contract = load_backbone(tmp_path / "artefact")
    assert contract.arch == arch and len(contract.training_hash) == 16
    assert (tmp_path / "tensorboard").is_dir() and list_checkpoints(tmp_path / "checkpoints")


def test_dinov3_smoke_config_trains_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/train_smoke_dinov3.yaml on a 2-block DINOv3-S: it trains (RoPE, 1 + 4 prefix tokens,
    16-px boxes), checkpoints, and writes an artefact with DINOv3's contract whose weights give a
    patch-16 feature grid."""
    use_tiny_backbone(monkeypatch)
    overrides = ["optim.steps=2", "runtime.progress=false", "runtime.tensorboard=false", "data.num_workers=0"]
    cfg = load_train_config(REPO / "configs" / "train_smoke_dinov3.yaml", [f"output_dir={tmp_path}", *overrides])
    artefact = train(cfg)
    contract = read_artefact_contract(artefact)
    assert (contract.arch, contract.family, contract.patch_size) == ("vit_small_patch16_dinov3", "dinov3", 16)
    assert (contract.num_registers, contract.position, len(contract.training_hash)) == (4, "rope", 16)
    points = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [1, 2] and all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in points)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt"]
    trained = load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")
    backbone = tiny_backbone(contract.arch)
    load_state_into(backbone, load_file(str(artefact / ARTEFACT_WEIGHTS)), str(artefact))
    for key, value in backbone.state_dict().items():  # the artefact is the last step's student backbone
        assert torch.equal(value, trained["student"][f"backbone.{key}"]), key
    grid, _ = patch_features(backbone.eval(), torch.randn(1, 3, 112, 160))
    assert grid.shape == (1, 7, 10, 384)


def test_recipe_variants_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fg masks, dropped registers, last-block-only training, euclidean + odd-even sorting,
    flips, one reference set per global crop."""
    use_tiny_backbone(monkeypatch)
    cfg = tiny_config(
        tmp_path,
        model={"keep_registers": False, "train_last_blocks": 1},
        crops={"global_size": 56, "flip_p": 0.5},  # masks need maps of at least 4x4 patches
        method={
            "mask_mode": "fg",
            "similarity": "euclidean",
            "sort_network": "odd_even",
            "reference_draw": "global_crop",
        },
    )
    dataset = build_dataset(cfg)
    trainer = Trainer(cfg, 4, torch.device("cpu"))
    frozen = trainer.model.backbone.blocks[0].attn.qkv.weight.clone()
    trained = trainer.model.backbone.blocks[1].attn.qkv.weight.clone()
    stats = trainer.train_step([collate([dataset[(i, i)] for i in range(2)])])
    assert stats["loss"] > 0 and stats["grad_norm"] > 0
    assert torch.equal(trainer.model.backbone.blocks[0].attn.qkv.weight, frozen)
    assert not torch.equal(trainer.model.backbone.blocks[1].attn.qkv.weight, trained)


def test_training_curve_survives_a_resume_and_is_drawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """curve.jsonl of a run killed after its step-3 log but with only the step-2 checkpoint left,
    then resumed, equals the curve of a run that went straight through; curve.png is drawn."""
    import json

    from PIL import Image

    use_tiny_backbone(monkeypatch)
    runtime = {"log_every": 1}
    straight = tiny_config(tmp_path / "a", runtime=runtime)
    train(straight)
    split = tiny_config(tmp_path / "b", runtime=runtime)
    train(split, stop_at=3)
    (tmp_path / "b" / "checkpoints" / "step_00000003.pt").unlink()  # killed before this write finished
    train(split, resume=True)
    lines = [json.loads(line) for line in (tmp_path / "a" / "curve.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "curve.jsonl").read_text() == (tmp_path / "a" / "curve.jsonl").read_text()
    with Image.open(tmp_path / "b" / "curve.png") as picture:
        assert picture.size == (560, 440)
        pixels = np.asarray(picture.convert("RGB"))
    assert ((pixels == (31, 119, 180)).all(axis=-1)).sum() > 50  # the loss line is drawn
    assert ((pixels == (214, 39, 40)).all(axis=-1)).sum() > 50  # and the learning-rate line
