"""The learned-upsampler plug: a tiny random-init module exported as a second Triton model and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neco.client.upsample import FeatureUpsampler, upsample_features
from neco.contract import ModelContract
from neco.export.errors import ExportError
from neco.export.upsampler import (
    FEATURES_IN,
    FEATURES_OUT,
    IMAGES_IN,
    ROLE,
    ROLE_PARAMETER,
    OnnxUpsampler,
    ServedUpsampler,
    export_upsampler,
)
from neco.triton_config import contract_from_config, read_model_config

ARCH = "vit_small_patch14_reg4_dinov2"


class TinyUpsampler(nn.Module):
    """JAFAR/AnyUp-shaped stand-in: bilinear features modulated by a convolution of the image."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.guide = nn.Conv2d(3, channels, 3, padding=1)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(features, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return up + self.mix(up) * torch.sigmoid(self.guide(image))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, nn.Module, ModelContract]:
    torch.manual_seed(0)
    contract = ModelContract.for_arch(ARCH)
    module = TinyUpsampler(contract.embed_dim).eval()
    repository = tmp_path_factory.mktemp("repository")
    return export_upsampler(module, contract, repository, "neco_upsampler"), module, contract


def test_the_upsampler_is_a_model_directory_with_the_encoders_contract(exported) -> None:
    model_dir, _, contract = exported
    assert (model_dir / "1" / "model.onnx").is_file()
    cfg = read_model_config(model_dir)
    assert cfg.name == "neco_upsampler" and cfg.backend == "onnxruntime"
    assert [i.name for i in cfg.input] == [FEATURES_IN, IMAGES_IN] and [o.name for o in cfg.output] == [FEATURES_OUT]
    assert list(cfg.input[0].dims) == [-1, -1, contract.embed_dim]
    assert cfg.parameters[ROLE_PARAMETER].string_value == ROLE
    assert contract_from_config(cfg).compatible_with(contract)


@pytest.mark.parametrize(("grid", "image_size"), [((8, 8), (112, 112)), ((5, 7), (75, 101))])
def test_onnxruntime_matches_the_torch_module_at_any_size(exported, grid, image_size) -> None:
    model_dir, module, contract = exported
    rng = np.random.default_rng(1)
    features = rng.standard_normal((*grid, contract.embed_dim)).astype(np.float32)
    image = rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)
    upsampler = OnnxUpsampler(model_dir)
    assert isinstance(upsampler, FeatureUpsampler)
    result = upsample_features(features, image, upsampler)
    assert result.shape == (*image_size, contract.embed_dim)
    with torch.no_grad():
        expected = ServedUpsampler(module, contract)(torch.from_numpy(features)[None], torch.from_numpy(image)[None])
    np.testing.assert_allclose(result, expected[0].numpy(), atol=1e-4, rtol=1e-4)


def test_a_file_without_the_interface_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not an upsampler model directory"):
        OnnxUpsampler(tmp_path)


def test_training_free_methods_share_the_same_entry_point(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    features = rng.standard_normal((4, 4, 6)).astype(np.float32)
    image = rng.integers(0, 256, (56, 42, 3), dtype=np.uint8)
    guided, bilinear = upsample_features(features, image, "guided"), upsample_features(features, image, "bilinear")
    assert guided.shape == bilinear.shape == (56, 42, 6)
    assert not np.allclose(guided, bilinear)
    out = np.lib.format.open_memmap(tmp_path / "hr.npy", mode="w+", dtype=np.float32, shape=guided.shape)
    upsample_features(features, image, "guided", out=out)  # pixel-resolution features straight to disk
    np.testing.assert_allclose(np.load(tmp_path / "hr.npy"), guided)
