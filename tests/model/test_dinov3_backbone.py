"""DINOv3 backbones through `neco.model`: creation, the dense-feature layout and every weight naming.

Each weight test writes a seeded random DINOv3 in one naming -- timm's, Meta's original
(`storage_tokens`, `ls1.gamma`, `qkv.bias` with a zero key third, `rope_embed.periods`), a
bare safetensors file, a tagged timm id in a fake local HF cache -- and requires the loaded
backbone to give the source's outputs exactly. Meta's naming is produced here by inverting
the renames independently of timm's filter, so a wrong mapping in either direction fails.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neco.contract import SAT493M_MEAN, ModelContract, UnsupportedArchitectureError
from neco.model import (
    ArchitectureMismatchError,
    DenseFeatureModel,
    create_backbone,
    load_backbone,
    patch_features,
    save_artefact,
)
from neco.model.testing import assert_same_features, random_backbone

ARCH = "vit_small_patch16_dinov3"


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    model = random_backbone(ARCH, seed=3)
    with torch.no_grad():  # non-trivial prefix tokens (timm initialises them near zero)
        model.reg_token.normal_()
        model.cls_token.normal_()
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))


def meta_dinov3_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 key naming, written from timm's by the inverse renames.

    Upstream stores the registers as `storage_tokens`, LayerScale as `lsN.gamma`, a packed
    `qkv.bias` (its key third masked to zero, with a `bias_mask` buffer), SwiGLU weights as
    `w1`/`w2`/`w3`, RoPE periods as a buffer and a pretraining-only `mask_token`.
    """
    out: dict[str, torch.Tensor] = {}
    swiglu = any(".mlp.fc1_g." in k for k in model.state_dict())
    for key, value in model.state_dict().items():
        if key.startswith("rope."):
            continue
        name = (
            key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        )
        name = name.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
        if swiglu:
            name = name.replace("mlp.fc2.", "mlp.w3.")
        out[name] = value.clone()
        if name.endswith("attn.qkv.weight"):
            out[name.replace("weight", "bias")] = torch.zeros(value.shape[0])
            out[name.replace("qkv.weight", "qkv.bias_mask")] = torch.ones(value.shape[0])
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    out["rope_embed.periods"] = torch.arange(1, model.embed_dim // model.blocks[0].attn.num_heads // 4 + 1).float()
    return out


def test_dinov3_layout_and_contract(source: torch.nn.Module, images: torch.Tensor) -> None:
    contract = ModelContract.for_arch(ARCH)
    assert (contract.patch_size, contract.num_prefix_tokens, contract.embed_dim) == (16, 5, 384)
    assert (contract.family, contract.position) == ("dinov3", "rope")
    grid, cls = patch_features(source, images)
    assert grid.shape == (2, 3, 5, 384) and cls.shape == (2, 384)
    tokens = source.forward_features(images)
    torch.testing.assert_close(grid[1, 2, 3], tokens[1, 5 + 2 * 5 + 3])  # 1 cls + 4 registers first
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        patch_features(source, torch.zeros(1, 3, 56, 56))


def test_dense_model_uses_the_contract_patch(source: torch.nn.Module) -> None:
    dense = DenseFeatureModel(source, ModelContract.for_arch(ARCH)).eval()
    with torch.no_grad():
        features, raw, cls = dense(torch.randint(0, 256, (1, 224, 320, 3), dtype=torch.uint8))
    assert features.shape == raw.shape == (1, 14, 20, 384) and cls.shape == (1, 384)
    with pytest.raises(ValueError, match="patch 16 != contract patch 14"):
        DenseFeatureModel(source, ModelContract.for_arch("vit_small_patch14_dinov2"))


def test_meta_naming_pth(tmp_path: Path, source: torch.nn.Module, images: torch.Tensor) -> None:
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(meta_dinov3_state(source), path)
    model, contract = load_backbone(path)
    assert contract == ModelContract.for_arch(ARCH)
    assert_same_features(source, model, images)


def test_meta_naming_refuses_a_nonzero_qkv_bias(tmp_path: Path, source: torch.nn.Module) -> None:
    state = meta_dinov3_state(source)
    state["blocks.0.attn.qkv.bias"][0] = 0.5
    path = tmp_path / "biased.pth"
    torch.save(state, path)
    with pytest.raises(ArchitectureMismatchError, match="qkv.bias is not zero"):
        load_backbone(path)


def test_swiglu_small_plus_in_meta_naming_is_told_from_small(tmp_path: Path) -> None:
    plus = random_backbone("vit_small_plus_patch16_dinov3", seed=4)
    path = tmp_path / "dinov3_vits16plus.pth"
    torch.save(meta_dinov3_state(plus), path)
    model, contract = load_backbone(path)
    assert contract.arch == "vit_small_plus_patch16_dinov3"
    assert_same_features(plus, model, torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)))


def test_bare_safetensors_and_artefact(tmp_path: Path, source: torch.nn.Module, images: torch.Tensor) -> None:
    bare = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in meta_dinov3_state(source).items()}, str(bare))
    model, contract = load_backbone(bare, arch=f"{ARCH}.lvd1689m")
    assert contract.arch == ARCH
    assert_same_features(source, model, images)
    artefact = save_artefact(source, ModelContract.for_arch(ARCH), tmp_path / "artefact", {"steps": 1})
    model, contract = load_backbone(artefact)
    assert contract.patch_size == 16
    assert_same_features(source, model, images)


def test_wrong_dinov3_size_is_refused(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "small.pth"
    torch.save(meta_dinov3_state(source), path)
    with pytest.raises(ArchitectureMismatchError, match="belong to another architecture"):
        load_backbone(path, arch="vit_base_patch16_dinov3")


def test_tagged_timm_id_from_local_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: torch.nn.Module, images: torch.Tensor
) -> None:
    """`vit_large...sat493m`-style ids pick the tag's weights file and normalisation, offline."""
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    asked: list[tuple[str, str]] = []

    def fake_cache(repo_id: str, filename: str) -> str | None:
        asked.append((repo_id, filename))
        return str(weights) if filename == "model.safetensors" else None

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", fake_cache)
    model, contract = load_backbone(f"{ARCH}.lvd1689m")
    assert asked[0] == ("timm/vit_small_patch16_dinov3.lvd1689m", "model.safetensors")
    assert contract == ModelContract.for_arch(ARCH)
    assert_same_features(source, model, images)
    assert ModelContract.for_arch("vit_large_patch16_dinov3.sat493m").mean == SAT493M_MEAN


def test_7b_is_listed_and_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="7B"):
        create_backbone("vit_7b_patch16_dinov3")
