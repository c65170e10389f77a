"""Feature backends: input validation, torch features vs timm's own API, ONNX vs torch parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neco.client.backend import FeatureBackend, batch_features
from neco.contract import IMAGENET_MEAN, IMAGENET_STD, ModelContract
from neco.evaluation.backends import BackendError, TorchBackend, make_backend, stack_images
from neco.model import create_backbone

ARCH = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def random_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(ARCH).eval()


def _images(n: int, h: int = 42, w: int = 56, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_stack_images_validates() -> None:
    assert stack_images(_images(2), 14).shape == (2, 42, 56, 3)
    with pytest.raises(BackendError, match="at least one"):
        stack_images([], 14)
    with pytest.raises(BackendError, match="multiple of the patch size"):
        stack_images(_images(1, 40, 56), 14)
    with pytest.raises(BackendError, match="image 1"):
        stack_images([_images(1)[0], _images(1, 28, 28)[0]], 14)
    with pytest.raises(BackendError, match="uint8"):
        stack_images([np.zeros((14, 14, 3), np.float32)], 14)


def test_torch_backend_matches_timm_intermediate_layers(random_model: torch.nn.Module) -> None:
    backend = TorchBackend(model=random_model, contract=ModelContract.for_arch(ARCH), device="cpu", batch_size=2)
    assert isinstance(backend, FeatureBackend)
    images = _images(3)
    feats = batch_features(backend, images)
    assert feats.shape == (3, 3, 4, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, atol=1e-5)
    # Independent path: timm's get_intermediate_layers (final norm, prefix tokens dropped).
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        (grid,) = random_model.get_intermediate_layers(x, n=1, reshape=True, norm=True)
    ref = torch.nn.functional.normalize(grid.permute(0, 2, 3, 1), dim=-1).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-4)


def test_make_backend_errors() -> None:
    with pytest.raises(BackendError, match="--source"):
        make_backend("onnx")
    with pytest.raises(BackendError, match="--arch"):
        make_backend("torch")
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend("tensorflow")  # type: ignore[arg-type]
    with pytest.raises(BackendError, match="does not exist"):
        make_backend("onnx", model="/nonexistent/model.onnx")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            TorchBackend(model=torch.nn.Identity(), contract=ModelContract.for_arch(ARCH), device="cuda")


def test_onnx_backend_matches_torch_on_the_exported_model(
    model_repository_model_dir, export_source_model: torch.nn.Module, tmp_path
) -> None:
    """Same weights, two runtimes: onnxruntime on the exported graph vs in-process PyTorch."""
    from neco.evaluation.backends import OnnxBackend

    onnx_backend = OnnxBackend(model_repository_model_dir, batch_size=2)  # contract from config.pbtxt
    torch_backend = TorchBackend(model=export_source_model, contract=onnx_backend.contract, device="cpu")
    assert onnx_backend.contract.arch == ARCH
    for h, w in ((42, 56), (70, 28)):
        images = _images(3, h, w, seed=h)
        a, b = batch_features(onnx_backend, images), batch_features(torch_backend, images)
        assert a.shape == (3, h // 14, w // 14, 384)
        np.testing.assert_allclose(a, b, atol=1e-3)
        assert (a * b).sum(-1).min() > 0.9999
    via_file = OnnxBackend(model_repository_model_dir / "1" / "model.onnx")
    assert via_file.contract == onnx_backend.contract
    lone = tmp_path / "model.onnx"  # a bare file has no config.pbtxt to read the contract from
    lone.symlink_to(model_repository_model_dir / "1" / "model.onnx")
    with pytest.raises(BackendError, match="--arch"):
        OnnxBackend(lone)
    assert OnnxBackend(lone, arch=ARCH).contract == ModelContract.for_arch(ARCH)
