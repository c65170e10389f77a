"""Boundary IoU against a brute-force computation written here, on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from neco.evaluation.boundary import BoundaryAccumulator, band_width, boundary_iou, inner_boundary
from neco.evaluation.metrics import MetricError


def band_by_brute_force(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels of `mask` with a pixel outside it (or outside the image) within chessboard distance d."""
    height, width = mask.shape
    band = np.zeros_like(mask, dtype=bool)
    for y in range(height):
        for x in range(width):
            if not mask[y, x]:
                continue
            for dy in range(-d, d + 1):
                for dx in range(-d, d + 1):
                    yy, xx = y + dy, x + dx
                    if not (0 <= yy < height and 0 <= xx < width) or not mask[yy, xx]:
                        band[y, x] = True
    return band


def boundary_iou_by_brute_force(prediction: np.ndarray, target: np.ndarray, classes: int, d: int) -> float:
    ious = []
    for c in range(classes):
        g, p = band_by_brute_force(target == c, d), band_by_brute_force(prediction == c, d)
        union = (g | p).sum()
        if union:
            ious.append((g & p).sum() / union)
    return float(np.mean(ious))


def hand_made() -> tuple[np.ndarray, np.ndarray]:
    """A 20x24 target with a square and an L, and a prediction with both shifted and one pixel noise."""
    target = np.zeros((20, 24), np.uint8)
    target[3:11, 4:12] = 1
    target[12:18, 14:22] = 2
    target[12:15, 14:17] = 0  # cut a corner: an L
    prediction = np.zeros_like(target)
    prediction[4:12, 5:13] = 1
    prediction[12:18, 13:22] = 2
    prediction[0, 23] = 2
    return prediction, target


def test_the_band_of_a_square_is_its_rim() -> None:
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    band = inner_boundary(mask, 1)
    expected = mask.copy()
    expected[3:6, 3:6] = False
    np.testing.assert_array_equal(band, expected)
    full = np.ones((4, 4), bool)  # the image border counts as outside
    assert inner_boundary(full, 1).sum() == 12 and inner_boundary(full, 2).all()


@pytest.mark.parametrize("d", [1, 2, 3])
def test_bands_match_brute_force(d: int) -> None:
    prediction, target = hand_made()
    for mask in (target == 0, target == 2, prediction == 2):
        np.testing.assert_array_equal(inner_boundary(mask, d), band_by_brute_force(mask, d))


@pytest.mark.parametrize("d", [1, 2])
def test_boundary_iou_matches_brute_force(d: int) -> None:
    prediction, target = hand_made()
    result = boundary_iou([prediction], [target], ["bg", "square", "ell"], width=d)
    assert result.miou == pytest.approx(boundary_iou_by_brute_force(prediction, target, 3, d))
    assert 0 < result.miou < 1


def test_a_perfect_mask_scores_one_and_ignore_pixels_drop_out() -> None:
    _, target = hand_made()
    assert boundary_iou([target], [target], ["bg", "square", "ell"], width=2).miou == 1.0
    wrong = target.copy()
    wrong[3:11, 4:12] = 0
    ignored = target.copy()
    ignored[2:12, 3:13] = 255  # the square's pixels (and a rim around them) are not scored
    result = boundary_iou([wrong], [ignored], ["bg", "square", "ell"], width=2)
    assert np.isnan(result.per_class[1])  # square: absent once its pixels are ignored
    assert result.per_class[2] == 1.0


def test_sums_run_over_the_dataset_and_the_default_width_is_2_percent_of_the_diagonal() -> None:
    prediction, target = hand_made()
    acc = BoundaryAccumulator(["bg", "square", "ell"], width=1)
    acc.update(prediction, target)
    acc.update(target, target)
    single = BoundaryAccumulator(["bg", "square", "ell"], width=1)
    single.update(prediction, target)
    assert (acc.union > single.union).all() and acc.result().miou > single.result().miou
    assert band_width((448, 448)) == 13 and band_width((20, 24)) == 1 and band_width((10, 10), 3) == 3
    with pytest.raises(MetricError):
        band_width((10, 10), 0)


class MeanColourBackend:
    """Patch feature = a fixed random lift of the patch's mean colour: no network, known behaviour."""

    def __init__(self) -> None:
        from neco.contract import ModelContract

        self.contract = ModelContract.for_arch("vit_small_patch14_reg4_dinov2")
        self.lift = np.random.default_rng(0).standard_normal((4, self.contract.embed_dim)).astype(np.float32) * 3

    def features(self, images) -> np.ndarray:
        batch = np.stack(images).astype(np.float32) / 255
        b, h, w, _ = batch.shape
        p = self.contract.patch_size
        mean = batch.reshape(b, h // p, p, w // p, p, 3).mean(axis=(2, 4))
        lifted = np.tanh(np.concatenate([mean, np.ones_like(mean[..., :1])], axis=-1) @ self.lift)
        return lifted / np.linalg.norm(lifted, axis=-1, keepdims=True)


def test_eval_hummingbird_upsample_is_reported_with_boundary_iou(tmp_path) -> None:
    import json

    from neco.cli import build_parser
    from neco.config import load_config
    from neco.evaluation.cli import HUMMINGBIRD_FLAGS, SEGMENTATION_FLAGS, _overrides
    from neco.evaluation.hummingbird import HummingbirdConfig, run_hummingbird
    from neco.scenes import write_scene_dataset

    root = write_scene_dataset(tmp_path / "scenes", {"train": 4, "val": 3}, size=(112, 112), num_classes=4, seed=3)
    argv = ["eval", "hummingbird", "--data-root", str(root), "--input-size", "112", "--protocol", "both"]
    reports = {}
    for method in ("bilinear", "guided"):
        out = tmp_path / f"{method}.json"
        args = build_parser().parse_args([*argv, "--upsample", method, "--out", str(out)])
        cfg = load_config(HummingbirdConfig, None, _overrides(args, SEGMENTATION_FLAGS + HUMMINGBIRD_FLAGS))
        assert cfg.upsample == method
        run_hummingbird(cfg, MeanColourBackend())
        reports[method] = json.loads(out.read_text())["results"]
    for method, results in reports.items():
        assert results["strict"]["upsample"] == results["hbird-eval"]["upsample"] == method
        assert 0 < results["strict"]["boundary_iou"] <= 1
    assert reports["guided"]["strict"]["boundary_iou"] > reports["bilinear"]["strict"]["boundary_iou"]
    assert HummingbirdConfig(data_root=root).upsample == "bilinear"  # the published protocol's default
