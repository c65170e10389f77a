"""Ordering agreement: its pieces against independent computations, and the metric end to end."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from neco.contract import ModelContract
from neco.evaluation.ordering import (
    OrderingError,
    intersection_points,
    ordering_agreement,
    sample_features,
    spearman_rows,
    to_view,
)
from neco.scenes import generate_scene

PATCH = 14


def test_spearman_rows_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 33))
    b = a + rng.normal(scale=rng.uniform(0.1, 3.0, (20, 1)), size=(20, 33))
    expected = [spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman_rows(a, b), expected, atol=1e-12)
    np.testing.assert_allclose(spearman_rows(a, a), 1.0)
    np.testing.assert_allclose(spearman_rows(a, -a), -1.0)


def test_bilinear_sampling_is_exact_on_a_linear_map():
    """A map linear in (y, x) is reproduced exactly by bilinear sampling between patch centres."""
    h, w = 5, 7
    ii, jj = np.mgrid[0:h, 0:w].astype(np.float64)
    fmap = np.stack([ii + 0.5, jj + 0.5, np.full_like(ii, 3.0)], -1)  # value = the patch centre
    points = np.array([[0.5, 0.5], [1.2, 3.9], [4.5, 6.5], [2.75, 0.6]])
    expected = np.concatenate([points, np.full((4, 1), 3.0)], 1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(sample_features(fmap, points), expected, atol=1e-12)


def test_intersection_grid_maps_into_both_views():
    a, b = (10.0, 0.0, 60.0, 80.0), (30.0, 20.0, 70.0, 40.0)
    points = intersection_points(a, b, 3)
    assert points.shape == (9, 2)
    assert points[:, 0].min() > 30 and points[:, 0].max() < 70 and points[:, 1].min() > 20 and points[:, 1].max() < 60
    # a point at a view's far corner lands on the resized view's far corner (in patch units)
    np.testing.assert_allclose(to_view(np.array([[70.0, 80.0]]), a, 56, PATCH), [[4.0, 4.0]])
    with pytest.raises(OrderingError, match="overlap"):
        intersection_points((0, 0, 10, 10), (20, 20, 5, 5), 2)


class ColourPatchBackend:
    """Features = a fixed random projection of each patch's pixels: position-true, no learning."""

    def __init__(self, noise: bool = False) -> None:
        self.contract = ModelContract.for_arch("vit_small_patch14_reg4_dinov2")
        self.projection = np.random.default_rng(1).normal(size=(PATCH * PATCH * 3, 32))
        self.noise, self.rng = noise, np.random.default_rng(2)

    def features(self, images):
        batch = np.stack(images).astype(np.float64) / 255
        b, h, w, _ = batch.shape
        patches = batch.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
        feats = patches.reshape(b, h // PATCH, w // PATCH, -1) @ self.projection
        if self.noise:
            feats = self.rng.normal(size=feats.shape)
        return (feats / np.linalg.norm(feats, axis=-1, keepdims=True)).astype(np.float32)


def _scenes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, size=(112, 112), num_classes=4, family="textures")[0] for _ in range(n)]


def test_agreement_separates_consistent_from_random_features():
    images, refs = _scenes(4), _scenes(2, seed=1)
    consistent = ordering_agreement(ColourPatchBackend(), images, refs, size=56, num_references=16, jitter_strength=0)
    random = ordering_agreement(ColourPatchBackend(noise=True), images, refs, size=56, num_references=16)
    assert consistent.points == 4 * 16 and consistent.images == 4 and consistent.num_references == 16
    assert consistent.mean_spearman > 0.5
    assert abs(random.mean_spearman) < 0.15
    # seeded: the same call gives the same number; colour jitter lowers a colour-based encoder's agreement
    again = ordering_agreement(ColourPatchBackend(), images, refs, size=56, num_references=16, jitter_strength=0)
    assert again == consistent
    jittered = ordering_agreement(ColourPatchBackend(), images, refs, size=56, num_references=16, jitter_strength=0.4)
    assert jittered.mean_spearman < consistent.mean_spearman


def test_bad_arguments():
    backend, images = ColourPatchBackend(), _scenes(1)
    with pytest.raises(OrderingError, match="size"):
        ordering_agreement(backend, images, images, size=50)
    with pytest.raises(OrderingError, match="num_references"):
        ordering_agreement(backend, images, images, size=56, num_references=1000)
    with pytest.raises(OrderingError, match="held-out"):
        ordering_agreement(backend, [], images, size=56)
    with pytest.raises(OrderingError, match="shape"):
        spearman_rows(np.zeros((2, 3)), np.zeros((2, 4)))


class RecordingBackend(ColourPatchBackend):
    """Colour features plus fresh noise per call, answered as a list of maps (as `NecoClient` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[np.ndarray] = []

    def features(self, images):
        clean = super().features(images)
        feats = clean + 0.3 * self.rng.normal(size=clean.shape).astype(np.float32)
        self.calls.append(feats)
        return list(feats)


def test_agreement_equals_an_independent_scipy_computation():
    """Whole-image views (min_scale=1) and a grid on the patch centres: the metric is the mean of scipy's
    Spearman over patches of the two views' similarities to the seeded reference draw."""
    images, refs, seed = _scenes(3), _scenes(2, seed=1), 5
    backend = RecordingBackend()
    result = ordering_agreement(backend, images, refs, size=56, num_references=12, grid=4, min_scale=1.0, seed=seed)
    reference_maps, *view_maps = backend.calls
    flat = reference_maps.reshape(-1, reference_maps.shape[-1])
    chosen = flat[np.random.default_rng(seed).choice(len(flat), 12, replace=False)]
    expected = []
    for pair in view_maps:  # one call per image: its two views
        a, b = (m.reshape(-1, m.shape[-1]) for m in pair)
        a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
        expected += [spearmanr(x @ chosen.T, y @ chosen.T).statistic for x, y in zip(a, b)]
    assert result.points == len(expected) == 3 * 16
    assert result.mean_spearman == pytest.approx(np.mean(expected), abs=1e-9)
    assert result.std_spearman == pytest.approx(np.std(expected), abs=1e-9)
