"""Guided upsampling: exact where values are constant, edges where the image has them, bounded memory, CLI."""

from __future__ import annotations

import contextlib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from neco.client import MemoryBank, segment
from neco.client.retrieval import segment_features
from neco.client.upsample import (
    GuidedSettings,
    UpsampleError,
    bilinear_argmax,
    guided_argmax,
    patch_colours,
    upsample_guided,
)

from .conftest import miou


def soft_labels(mask: np.ndarray, patch: int, num_classes: int) -> np.ndarray:
    """(K, h, w) share of each class over each patch's pixels: the oracle patch scores."""
    h, w = mask.shape[0] // patch, mask.shape[1] // patch
    one_hot = np.eye(num_classes, dtype=np.float32)[mask]
    return one_hot.reshape(h, patch, w, patch, num_classes).mean(axis=(1, 3)).transpose(2, 0, 1)


def test_constant_values_come_back_exactly_whatever_the_image() -> None:
    rng = np.random.default_rng(0)
    guide = rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)
    values = np.broadcast_to(np.asarray([0.25, -3.0, 7.5], np.float32), (5, 4, 3)).copy()
    out = upsample_guided(values, guide)
    assert out.shape == (61, 47, 3)
    np.testing.assert_allclose(out, np.broadcast_to(values[0, 0], out.shape), rtol=1e-6)


def test_a_constant_region_stays_exact_away_from_its_border() -> None:
    """Pixels whose every tap lies in a constant block get that block's value, even next to an edge."""
    rng = np.random.default_rng(1)
    values = np.zeros((8, 8, 2), np.float32)
    values[:, 4:] = [3.0, -1.0]
    values[:, :4] = rng.random((8, 4, 2))  # noise on the left half only
    guide = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = upsample_guided(values, guide)
    # radius 1: pixels whose nearest patch column is >= 5 see only columns 4..7
    right = out[:, 5 * 14 :]
    np.testing.assert_allclose(right, np.broadcast_to([3.0, -1.0], right.shape), rtol=1e-6)


def test_edges_of_a_step_image_are_kept_where_bilinear_blurs_them() -> None:
    size, step = 224, 101  # the step falls inside patch column 7 (pixels 98..111), not on a patch border
    truth = np.zeros((size, size), np.uint8)
    truth[:, step:] = 1
    guide = np.where(truth[..., None] == 1, 230, 20).astype(np.uint8).repeat(3, axis=2)
    grid = soft_labels(truth, 14, 2)
    guided, _, _ = guided_argmax(grid, guide, keep_scores=False)
    bilinear, _, _ = bilinear_argmax(grid, (size, size), keep_scores=False)
    assert (bilinear != truth).any()  # the patch grid alone cannot say where inside patch 7 the edge is
    np.testing.assert_array_equal(guided, truth)


def test_the_guide_is_averaged_over_each_patchs_pixels() -> None:
    guide = np.zeros((28, 42, 3), np.uint8)
    guide[:14, :14] = 255
    colours = patch_colours(guide, (2, 3))
    assert colours.shape == (2, 3, 3)
    np.testing.assert_allclose(colours[..., 0], [[1, 0, 0], [0, 0, 0]])


def test_guided_scores_match_the_band_by_band_labels() -> None:
    rng = np.random.default_rng(2)
    grid = rng.random((4, 6, 5)).astype(np.float32)
    guide = rng.integers(0, 256, (83, 71, 3), dtype=np.uint8)
    small = GuidedSettings(tile_pixels=300)  # many bands, one of them partial
    label, confidence, scores = guided_argmax(grid, guide, keep_scores=True, settings=small)
    whole = upsample_guided(np.moveaxis(grid, 0, -1), guide)
    np.testing.assert_allclose(np.moveaxis(scores, 0, -1), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(label, whole.argmax(-1))
    np.testing.assert_allclose(confidence, whole.max(-1), rtol=1e-5)


def test_memory_stays_bounded_on_a_4096_px_image() -> None:
    """Beyond the (H, W) label and confidence maps, working memory is a few bands, not the image."""
    size = 4096
    rng = np.random.default_rng(3)
    guide = np.empty((size, size, 3), np.uint8)
    guide[:] = rng.integers(0, 256, (1, size, 3), dtype=np.uint8)  # input, allocated before tracing
    grid = rng.random((3, 32, 32)).astype(np.float32)  # a 448-px encoder input's grid
    outputs = size * size * (1 + 4)  # uint8 labels + float32 confidence
    tracemalloc.start()
    try:
        label, confidence, _ = guided_argmax(grid, guide, keep_scores=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert label.shape == confidence.shape == (size, size)
    assert peak < outputs + 32 * 2**20, f"peak {peak / 2**20:.0f} MiB for {outputs / 2**20:.0f} MiB of outputs"


def test_guided_needs_a_guide_of_the_output_size(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224[:2], image_size=224, num_classes=4)
    features = np.asarray(colour_backend.features(scenes_224[2][0][None]))[0]
    with pytest.raises(UpsampleError, match="needs the image"):
        segment_features(features, bank, (224, 224), upsample="guided")
    with pytest.raises(UpsampleError, match="224x224"):
        segment_features(features, bank, (224, 224), upsample="guided", guide=scenes_224[2][0][:100])
    with pytest.raises(UpsampleError, match="one of"):
        segment_features(features, bank, (224, 224), upsample="bicubic")  # type: ignore[arg-type]


def test_segment_says_which_upsampler_made_the_mask(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224[:3], image_size=224, num_classes=4)
    image, truth = scenes_224[3]
    guided = segment(colour_backend, image, bank, return_scores=True)
    bilinear = segment(colour_backend, image, bank, upsample="bilinear")
    assert guided.upsample == "guided" and bilinear.upsample == "bilinear"
    assert segment_features(np.zeros((2, 2, 384), np.float32) + 0.05, bank, (4, 4)).upsample == "bilinear"
    assert guided.scores.shape == (4, 224, 224)
    assert miou(guided.mask, truth) >= miou(bilinear.mask, truth)


def test_cli_segment_passes_the_upsampler_and_reports_it(colour_backend, scenes_224, tmp_path: Path, capsys) -> None:
    from PIL import Image

    import neco.client.cli as client_cli
    from neco.cli import build_parser

    bank = MemoryBank.build(colour_backend, scenes_224[:3], image_size=224, num_classes=4)
    bank.save(tmp_path / "bank")
    Image.fromarray(scenes_224[3][0]).save(tmp_path / "query.png")
    seen: list[str] = []

    class FakeClient:
        def segment(self, image, support, **options):
            seen.append(options["upsample"])
            return segment(colour_backend, image, support, **options)

    base = ["segment", str(tmp_path / "query.png"), "--bank", str(tmp_path / "bank"), "--out", str(tmp_path / "m.png")]
    parser = build_parser()
    assert parser.parse_args(base).upsample == "guided"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--upsample", "bicubic"])
    args = parser.parse_args([*base, "--upsample", "bilinear"])
    original = client_cli._client
    client_cli._client = lambda _args: contextlib.nullcontext(FakeClient())
    try:
        assert args.handler(args) == 0
    finally:
        client_cli._client = original
    assert seen == ["bilinear"]
    assert "bilinear upsampling" in capsys.readouterr().out
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (224, 224)
