"""Backbone creation, dense-feature layout and every supported weight format.

Each format test builds a random-init source model, writes it in that format (official DINOv2
naming is produced independently from timm's by inverting the documented renames), loads it
back through `load_backbone` and requires identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neco.contract import ARTEFACT_METADATA, ARTEFACT_WEIGHTS, ModelContract
from neco.model import (
    ArchitectureMismatchError,
    WeightsError,
    create_backbone,
    freeze_all_but_last_blocks,
    load_backbone,
    patch_features,
    save_artefact,
)
from neco.model.testing import assert_same_features
from tests.training.tiny import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_backbone(ARCH).eval()
    with torch.no_grad():  # random, non-trivial values for tokens that timm initialises to ~0
        model.reg_token.normal_()
        model.cls_token.normal_()
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(1))


def _official_dinov2_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Torch-hub DINOv2 naming: class token outside pos_embed, pos_embed with a class slot,
    `register_tokens`, and a `mask_token`; blocks are named identically."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pos_cls = torch.randn(1, 1, model.embed_dim)
    out = {k: v for k, v in state.items() if k not in {"cls_token", "reg_token", "pos_embed"}}
    out["cls_token"] = state["cls_token"] - pos_cls  # hub adds pos_embed[:, 0] to the class token
    out["pos_embed"] = torch.cat([pos_cls, state["pos_embed"]], dim=1)
    out["register_tokens"] = state["reg_token"]
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    return out


def test_patch_features_layout(source: torch.nn.Module, images: torch.Tensor) -> None:
    grid, cls = patch_features(source, images)
    patch = ModelContract.for_arch(ARCH).patch_size
    assert grid.shape == (2, 56 // patch, 70 // patch, 384)
    assert cls.shape == (2, 384)
    tokens = source.forward_features(images)
    torch.testing.assert_close(grid[1, 2, 3], tokens[1, 5 + 2 * 5 + 3])  # 1 cls + 4 registers first
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_features(source, torch.zeros(1, 3, 50, 56))


def test_artefact_roundtrip(tmp_path: Path, source: torch.nn.Module, images: torch.Tensor) -> None:
    config = {"steps": 3, "lr": 1e-5}
    out = save_artefact(source, ModelContract.for_arch(ARCH), tmp_path / "art", config)
    assert (out / ARTEFACT_WEIGHTS).is_file()
    meta = json.loads((out / ARTEFACT_METADATA).read_text())
    assert meta["training_config"] == config and len(meta["contract"]["training_hash"]) == 16
    model, contract = load_backbone(out)
    assert contract.arch == ARCH and contract.training_hash == meta["contract"]["training_hash"]
    assert not model.training
    assert_same_features(source, model, images)
    with pytest.raises(ArchitectureMismatchError):
        load_backbone(out, arch="vit_small_patch14_dinov2")


def test_artefact_refuses_bad_metadata(tmp_path: Path, source: torch.nn.Module) -> None:
    out = save_artefact(source, ModelContract.for_arch(ARCH), tmp_path / "art", {})
    meta = json.loads((out / ARTEFACT_METADATA).read_text())
    meta["format_version"] = 99
    (out / ARTEFACT_METADATA).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="newer"):
        load_backbone(out)
    with pytest.raises(ArchitectureMismatchError):
        save_artefact(source, ModelContract.for_arch("vit_base_patch14_reg4_dinov2"), tmp_path / "x", {})


def test_official_dinov2_pth(tmp_path: Path, source: torch.nn.Module, images: torch.Tensor) -> None:
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(_official_dinov2_state(source), path)
    model, contract = load_backbone(path)
    assert contract.arch == ARCH and contract.training_hash == ""
    assert_same_features(source, model, images)


def test_official_dinov2_without_registers(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(3)
    plain = create_backbone("vit_small_patch14_dinov2").eval()
    state = dict(plain.state_dict(), mask_token=torch.zeros(1, 384))
    torch.save(state, tmp_path / "dinov2_vits14.pth")
    model, contract = load_backbone(tmp_path / "dinov2_vits14.pth")
    assert contract.arch == "vit_small_patch14_dinov2"
    assert_same_features(plain, model, images)


def test_lightning_ckpt_strips_prefixes(tmp_path: Path, source: torch.nn.Module, images: torch.Tensor) -> None:
    official = _official_dinov2_state(source)
    state = {f"model.student.backbone.{k}": v for k, v in official.items()}
    state.update({f"model.teacher.backbone.{k}": torch.zeros_like(v) for k, v in official.items()})
    state["model.student.head.mlp.0.weight"] = torch.randn(8, 384)
    ckpt = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.2.0", "state_dict": state}
    torch.save(ckpt, tmp_path / "neco.ckpt")
    model, _ = load_backbone(tmp_path / "neco.ckpt")
    assert_same_features(source, model, images)


def test_wrong_architecture_is_refused(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "small.pth"
    torch.save(_official_dinov2_state(source), path)
    with pytest.raises(ArchitectureMismatchError, match="another architecture"):
        load_backbone(path, arch="vit_base_patch14_reg4_dinov2")
    truncated = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.11.")}
    truncated["blocks.11.norm1.weight"] = source.state_dict()["blocks.11.norm1.weight"]
    torch.save(truncated, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="missing"):
        load_backbone(tmp_path / "partial.pth")
    no_registers = {k: v for k, v in _official_dinov2_state(source).items() if k != "register_tokens"}
    torch.save(no_registers, tmp_path / "noreg.pth")
    with pytest.raises(ArchitectureMismatchError, match="no register tokens"):
        load_backbone(tmp_path / "noreg.pth", arch=ARCH)


def test_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="weights_only"):
        load_backbone(tmp_path / "junk.pth")


def test_timm_id_from_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source, images) -> None:
    """A timm id resolves through the HF cache layout, with no network (offline mode)."""
    from safetensors.torch import save_file

    repo = tmp_path / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    model, contract = load_backbone("vit_small_patch14_reg4_dinov2.lvd142m")
    assert contract.arch == ARCH
    assert_same_features(source, model, images)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_backbone("vit_base_patch14_dinov2.lvd142m")


def test_freeze_last_blocks() -> None:
    model = create_backbone(ARCH)
    freeze_all_but_last_blocks(model, 2)
    trainable = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"blocks.10", "blocks.11", "norm"}
    with pytest.raises(ValueError, match="outside"):
        freeze_all_but_last_blocks(model, 13)
