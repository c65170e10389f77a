"""The shared contract: architecture table, Triton-parameter round trip, torch-freedom."""

import subprocess
import sys

import pytest

from neco import contract


def test_arch_table_covers_all_dinov2_sizes_with_and_without_registers():
    dims = {"small": 384, "base": 768, "large": 1024, "giant": 1536}
    for size, dim in dims.items():
        plain = contract.arch_spec(f"vit_{size}_patch14_dinov2")
        reg = contract.arch_spec(f"vit_{size}_patch14_reg4_dinov2")
        assert (plain.embed_dim, plain.num_registers) == (dim, 0)
        assert (reg.embed_dim, reg.num_registers) == (dim, 4)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'vit_tiny'"):
        contract.arch_spec("vit_tiny")
    with pytest.raises(ValueError, match="unknown architecture"):
        contract.ModelContract(arch="resnet50", embed_dim=2048)


def test_parameters_round_trip_and_missing_key():
    original = contract.ModelContract.for_arch("vit_base_patch14_reg4_dinov2", training_hash="abc123")
    params = original.to_parameters()
    assert all(isinstance(v, str) for v in params.values())
    assert contract.ModelContract.from_parameters(params) == original
    del params["neco_arch"]
    with pytest.raises(ValueError, match="neco_arch"):
        contract.ModelContract.from_parameters(params)


def test_contract_compatibility_is_exact():
    a = contract.ModelContract.for_arch("vit_small_patch14_dinov2")
    assert a.compatible_with(contract.ModelContract.for_arch("vit_small_patch14_dinov2"))
    assert not a.compatible_with(contract.ModelContract.for_arch("vit_small_patch14_dinov2", training_hash="x"))


def test_contract_module_does_not_import_torch():
    code = "import sys, neco.contract, neco.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_facts_agree_with_timm():
    """Every registered architecture, 7B included, built on the meta device (no memory, no weights)."""
    import timm
    import torch

    for name, spec in contract.ARCHS.items():
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0)
        facts = (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads, model.num_prefix_tokens)
        assert facts == (spec.embed_dim, spec.depth, spec.num_heads, spec.num_prefix_tokens), name
        assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size), name
        assert (getattr(model, "pos_embed", None) is None) == (spec.position == "rope"), name
        for tag in spec.weight_tags:
            cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
            assert cfg is not None, f"{name}.{tag}"
            assert contract.tag_normalisation(f"{name}.{tag}") == (tuple(cfg.mean), tuple(cfg.std)), f"{name}.{tag}"


def test_dinov3_contracts_and_the_refused_7b():
    small = contract.ModelContract.for_arch("vit_small_patch16_dinov3")
    assert (small.family, small.patch_size, small.num_prefix_tokens, small.position) == ("dinov3", 16, 5, "rope")
    assert contract.ModelContract.from_parameters(small.to_parameters()) == small
    sat = contract.ModelContract.for_arch("vit_large_patch16_dinov3.sat493m")
    assert (sat.arch, sat.mean, sat.std) == ("vit_large_patch16_dinov3", contract.SAT493M_MEAN, contract.SAT493M_STD)
    assert "mean" in " ".join(sat.differences(contract.ModelContract.for_arch("vit_large_patch16_dinov3")))
    with pytest.raises(contract.UnsupportedArchitectureError, match="listed but not supported"):
        contract.ModelContract.for_arch("vit_7b_patch16_dinov3")
    with pytest.raises(ValueError, match="no pretrained tag 'sat493m'"):
        contract.ModelContract.for_arch("vit_small_patch16_dinov3.sat493m")
    with pytest.raises(ValueError, match="patch_size=14 \\(expected 16\\)"):
        contract.ModelContract(arch="vit_small_patch16_dinov3", patch_size=14)


def test_contracts_written_before_the_new_fields_still_load():
    """Artefacts, configs and bank manifests of DINOv2 models lack family/position/patch/registers."""
    old = contract.ModelContract.model_validate({"arch": "vit_small_patch14_reg4_dinov2", "embed_dim": 384})
    assert old == contract.ModelContract.for_arch("vit_small_patch14_reg4_dinov2")
    params = {"neco_arch": "vit_small_patch14_reg4_dinov2", "neco_embed_dim": "384", "neco_training_hash": ""}
    assert contract.ModelContract.from_parameters(params) == old
    assert old.grid(224, 308) == (16, 22)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        old.grid(224, 320)
