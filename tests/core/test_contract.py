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
