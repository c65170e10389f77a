"""Label transfer on synthetic features with known answers, upsampling parity, segment() forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from neco.client import ImageError, MemoryBank, SupportSetError, segment
from neco.client.bank import BankRows, BankSettings
from neco.client.errors import BankContractError
from neco.client.retrieval import segment_features, transfer_labels, upsample_bilinear
from neco.client.upsample import bilinear_argmax
from neco.contract import ModelContract
from neco.signature import InputLimits

from .conftest import ARCH, ColourBackend, miou

CONTRACT = ModelContract.for_arch(ARCH)


def _prototype_bank(noise: float = 0.05, per_class: int = 40, seed: int = 0) -> tuple[MemoryBank, np.ndarray]:
    """Three classes, each a cluster around an orthogonal prototype, with one-hot soft labels."""
    rng = np.random.default_rng(seed)
    protos = np.linalg.qr(rng.standard_normal((384, 3)))[0].T.astype(np.float32)  # (3, 384) orthonormal
    feats = (
        np.repeat(protos, per_class, axis=0) + noise * rng.standard_normal((3 * per_class, 384)).astype(np.float32) / 20
    )
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    soft = np.repeat(np.eye(3, dtype=np.float32), per_class, axis=0)
    return MemoryBank(CONTRACT, BankRows(feats, soft), BankSettings(class_names=["a", "b", "c"])), protos


def test_transfer_labels_matches_the_formula() -> None:
    sims = np.array([[0.9, 0.8, 0.1]], dtype=np.float32)
    neighbours = np.array([[0, 1, 2]])
    soft = np.array([[1, 0], [0.5, 0.5], [0, 1]], dtype=np.float32)
    weights = np.exp(sims[0] / 0.02) / np.exp(sims[0] / 0.02).sum()
    expected = weights @ soft
    np.testing.assert_allclose(transfer_labels(sims, neighbours, soft, 0.02)[0], expected, rtol=1e-5)
    # High temperature -> plain average of the neighbours' labels.
    np.testing.assert_allclose(transfer_labels(sims, neighbours, soft, 1e6)[0], soft.mean(axis=0), rtol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        transfer_labels(sims, neighbours, soft, 0.0)


def test_known_answer_segmentation_from_synthetic_features() -> None:
    bank, protos = _prototype_bank()
    grid = np.zeros((4, 6, 384), dtype=np.float32)
    grid[:, :2], grid[:, 2:4], grid[:, 4:] = protos[0], protos[1], protos[2]
    result = segment_features(grid, bank, (40, 60), k=30, return_scores=True)
    assert result.mask.shape == (40, 60) and result.scores.shape == (3, 40, 60)
    # Columns 0-19 are class a, 20-39 b, 40-59 c, except one bilinear transition pixel per border.
    assert (result.mask[:, :19] == 0).all() and (result.mask[:, 21:39] == 1).all() and (result.mask[:, 41:] == 2).all()
    np.testing.assert_allclose(result.scores.sum(axis=0), 1, atol=1e-4)  # scores are distributions
    assert result.confidence[:, :5].min() > 0.99
    np.testing.assert_allclose(result.confidence, result.scores.max(axis=0))


def test_mixed_neighbours_give_soft_answer_and_k_is_clamped() -> None:
    bank, protos = _prototype_bank(per_class=2)
    between = (protos[0] + protos[1]) / np.sqrt(2)
    result = segment_features(between[None, None], bank, (1, 1), k=100, return_scores=True)
    np.testing.assert_allclose(result.scores[:, 0, 0], [0.5, 0.5, 0.0], atol=0.05)


def test_bilinear_upsampling_matches_torch_align_corners_false() -> None:
    scores = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    for size in [(20, 28), (33, 17), (5, 7), (64, 3)]:
        expected = F.interpolate(torch.from_numpy(scores)[None], size=size, mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(upsample_bilinear(scores, size), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("alpha", [0.05, 1.0])
def test_fused_argmax_equals_argmax_of_upsampled_scores(alpha: float) -> None:
    """The class-pruning, plane-by-plane argmax must equal the plain computation exactly."""
    rng = np.random.default_rng(1)
    grid = rng.dirichlet(np.full(21, alpha), size=(3, 4)).transpose(2, 0, 1).astype(np.float32)  # peaked or flat
    if alpha < 1:  # make sure the pruning path runs: some classes never reach the floor
        assert (grid.max(axis=(1, 2)) < grid.sum(axis=0).min() / 21).any()
    full = upsample_bilinear(grid, (37, 52))
    mask, confidence, scores = bilinear_argmax(grid, (37, 52), keep_scores=False)
    assert scores is None
    np.testing.assert_array_equal(mask, full.argmax(axis=0))
    np.testing.assert_allclose(confidence, full.max(axis=0), atol=1e-6)
    mask_kept, _, kept = bilinear_argmax(grid, (37, 52), keep_scores=True)
    np.testing.assert_array_equal(mask_kept, mask)
    np.testing.assert_allclose(kept, full, atol=1e-6)


def test_segment_accepts_bank_saved_bank_and_pairs(colour_backend, scenes_224, tmp_path: Path) -> None:
    image, mask = scenes_224[0]
    bank = MemoryBank.build(colour_backend, scenes_224, image_size=224)
    bank.save(tmp_path / "bank")
    for support in (bank, tmp_path / "bank", str(tmp_path / "bank"), scenes_224):
        result = segment(colour_backend, image, support)
        assert result.mask.shape == mask.shape
        assert miou(result.mask, mask) >= 0.9
    with pytest.raises(SupportSetError, match="empty"):
        segment(colour_backend, image, [])


def test_mask_comes_back_at_the_input_size(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224, image_size=224)
    odd = scenes_224[1][0][:201, :157]
    result = segment(colour_backend, odd, bank)
    assert result.mask.shape == (201, 157) and result.confidence.shape == (201, 157)
    assert miou(result.mask, scenes_224[1][1][:201, :157]) > 0.8


def test_segment_refuses_a_bank_of_another_model(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224[:1], image_size=224)
    other = ColourBackend(ModelContract.for_arch(ARCH, training_hash="abc"))
    with pytest.raises(BankContractError, match="rebuild the bank"):
        segment(other, scenes_224[0][0], bank)


def test_segment_prepares_the_query_within_the_backends_own_limits(colour_backend, scenes_224) -> None:
    """Regression: segment() used the default InputLimits, whatever limits the backend has."""
    bank = MemoryBank.build(colour_backend, scenes_224, image_size=224)
    tight = ColourBackend()
    tight.limits = InputLimits(max_side=448, max_image_pixels=224 * 224, max_request_pixels=224 * 224)
    with pytest.raises(ImageError, match="max_image_pixels=50176"):
        segment(tight, scenes_224[0][0], bank, size=(238, 238), allow_size_mismatch=True)
    assert tight.calls == []  # refused before anything was sent
    roomy = ColourBackend()
    roomy.limits = InputLimits(max_image_pixels=1036 * 1036, max_request_pixels=1036 * 1036)
    assert segment(roomy, scenes_224[0][0], bank, size=(1036, 1036), allow_size_mismatch=True).input_size == (
        1036,
        1036,
    )  # > 1 MP default


def test_the_overlay_draws_the_query_segment_already_decoded(colour_backend, scenes_224, tmp_path: Path) -> None:
    image, _ = scenes_224[0]
    path = tmp_path / "query.png"
    Image.fromarray(image).save(path)
    bank = MemoryBank.build(colour_backend, scenes_224, image_size=224)
    result = segment(colour_backend, path, bank, size=112, allow_size_mismatch=True)
    assert result.image.size == (112, 112) and result.image.original_size == (224, 224)
    expected = np.asarray(result.overlay(path))
    path.unlink()  # a second read would now fail
    np.testing.assert_array_equal(np.asarray(result.overlay()), expected)
    with pytest.raises(ValueError, match="pass the image"):
        segment_features(np.asarray(colour_backend.features(image[None]))[0], bank, (224, 224)).overlay()


def test_bank_build_prepares_support_images_within_the_backends_own_limits(scenes_224) -> None:
    """Regression: building a bank resized support images with the default InputLimits."""
    tight = ColourBackend()
    tight.limits = InputLimits(max_side=448, max_image_pixels=224 * 224, max_request_pixels=224 * 224)
    with pytest.raises(ImageError, match="max_image_pixels=50176"):
        MemoryBank.build(tight, scenes_224[:1], image_size=(238, 238))
    assert tight.calls == []
    roomy = ColourBackend()
    roomy.limits = InputLimits(max_image_pixels=1036 * 1036, max_request_pixels=1036 * 1036)
    assert MemoryBank.build(roomy, scenes_224[:1], image_size=(1036, 1036)).image_size == (1036, 1036)
