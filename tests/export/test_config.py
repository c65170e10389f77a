"""ExportConfig validation: sizes, profiles and cross-field rules fail before any work."""

from pathlib import Path

import pytest

from neco.config import ConfigError, load_config
from neco.export.config import ExportConfig, TensorRTSettings, check_size, validate_profile
from neco.export.errors import ProfileError

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("export_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(ExportConfig, path)
    assert cfg.source


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"export_onnx.yaml", "export_int8_cpu.yaml", "export_tensorrt.yaml"}


@pytest.mark.parametrize("size", [(224, 225), (0, 224), (100, 112)])
def test_non_patch_multiple_sizes_are_refused(size):
    with pytest.raises(ProfileError, match="multiples of the patch size 14"):
        check_size(size, "size")
    with pytest.raises(ConfigError, match="parity.sizes"):
        load_config(ExportConfig, None, ["source=x", f"parity.sizes=[[{size[0]}, {size[1]}]]"])


def test_profile_must_be_ordered_and_patch_aligned():
    validate_profile((1, 224, 224), (4, 448, 336), (8, 896, 896))
    with pytest.raises(ProfileError, match="batch: need min <= opt <= max"):
        validate_profile((4, 224, 224), (2, 224, 224), (8, 224, 224))
    with pytest.raises(ProfileError, match="width: need min <= opt <= max"):
        validate_profile((1, 224, 448), (1, 224, 224), (1, 224, 896))
    with pytest.raises(ProfileError, match="opt size 448x300"):
        validate_profile((1, 224, 224), (1, 448, 300), (1, 896, 896))
    with pytest.raises(ProfileError, match="batch 0"):
        validate_profile((0, 224, 224), (1, 224, 224), (1, 224, 224))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        TensorRTSettings(max_shape=(8, 900, 896))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_config(ExportConfig, None, ["source=x", "backend=tensorrt", "triton.max_batch_size=16"])
    with pytest.raises(ConfigError, match="instead of precision int8"):
        load_config(ExportConfig, None, ["source=x", "backend=tensorrt", "precision=int8"])
    with pytest.raises(ConfigError, match="exceed max_batch_size"):
        load_config(ExportConfig, None, ["source=x", "triton.preferred_batch_sizes=[16]"])
    with pytest.raises(ConfigError, match="onnx.opset"):
        load_config(ExportConfig, None, ["source=x", "onnx.opset=17"])


def test_unknown_architecture_and_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown architecture 'vit_huge_patch16'"):
        load_config(ExportConfig, None, ["source=w.pth", "arch=vit_huge_patch16"])
    with pytest.raises(ConfigError, match="model_nmae"):
        load_config(ExportConfig, None, ["source=x", "model_nmae=typo"])
    with pytest.raises(ConfigError, match="model_name"):
        load_config(ExportConfig, None, ["source=x", "model_name=../escape"])
