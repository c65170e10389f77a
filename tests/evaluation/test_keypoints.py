"""SPair-71k keypoints: nearest-patch matching and PCK against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.cli import main
from neco.contract import ModelContract
from neco.evaluation.datasets import DatasetError
from neco.evaluation.keypoints import (
    KeypointConfig,
    PCKAccumulator,
    keypoint_patches,
    match_keypoints,
    pck_correct,
    run_keypoints,
    spair_pairs,
)
from neco.scenes import generate_scene

SIZE, PATCH = 112, 14  # an 8 x 8 patch grid, no resizing


class PatchContentBackend:
    """Features = each patch's own centred pixels: identical content gives identical features."""

    contract = ModelContract.for_arch("vit_large_patch14_dinov2")  # 1024 channels hold 14 * 14 * 3 pixels

    def features(self, images):
        out = []
        for image in images:
            h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
            x = image.astype(np.float32).reshape(h, PATCH, w, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, -1)
            x -= x.mean(-1, keepdims=True)
            x = np.concatenate([x, np.zeros((h, w, self.contract.embed_dim - x.shape[-1]), np.float32)], axis=-1)
            out.append(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6))
        return np.stack(out)


def test_patches_matching_and_pck_by_hand() -> None:
    np.testing.assert_array_equal(keypoint_patches(np.array([[0, 0], [111.9, 14], [200, -3]]), (112, 112), (8, 8)),
                                  [[0, 0], [1, 7], [0, 7]])  # fmt: skip
    rng = np.random.default_rng(0)
    source = rng.normal(size=(8, 8, 16))
    target = np.roll(source, 2, axis=1)  # content moved 2 patches (28 px) right
    kps = np.array([[7.0, 7.0], [35.0, 49.0], [14.0, 70.0]])  # two patch centres and a patch corner
    predicted = match_keypoints(source, target, kps, (112, 112), (112, 112))
    np.testing.assert_allclose(predicted, [[35, 7], [63, 49], [49, 77]])  # the corner maps to its patch centre
    truth = kps + [28, 0]
    # Errors 0, 0 and |(49, 77) - (42, 70)| = 7 * sqrt(2) ~ 9.9 px; bbox 100 px -> thresholds 10 and 5.
    bbox = (0, 0, 100, 60)
    np.testing.assert_array_equal(pck_correct(predicted, truth, bbox, 0.1), [True, True, True])
    np.testing.assert_array_equal(pck_correct(predicted, truth, bbox, 0.05), [True, True, False])
    # A copy shown twice as large (same grid, 224 px): predictions scale with the image.
    np.testing.assert_allclose(match_keypoints(source, source, kps[:2], (112, 112), (224, 224)), [[14, 14], [70, 98]])
    # A mirrored copy: patch (0, 0) is found in column 7, whose centre is exactly the mirrored keypoint.
    mirrored = match_keypoints(source, source[:, ::-1], kps[:2], (112, 112), (112, 112))
    np.testing.assert_allclose(mirrored, [[112 - 7, 7], [112 - 35, 49]])
    acc = PCKAccumulator()
    acc.update("cat", predicted, truth, bbox)
    acc.update("dog", predicted[:1], truth[:1] + [20, 0], bbox)  # 20 px off: wrong at both
    result = acc.result()
    assert result["pck@0.1"]["per_category"] == {"cat": 1.0, "dog": 0.0}
    assert result["pck@0.1"]["mean"] == 0.5 and result["pck@0.1"]["all"] == 0.75
    assert result["pck@0.05"]["mean"] == pytest.approx(1 / 3) and result["keypoints"] == 4


def test_soft_argmax_moves_towards_the_runner_up() -> None:
    source = np.zeros((1, 1, 2))
    source[0, 0] = [1, 0]
    target = np.tile(np.array([0.0, 1.0]), (3, 3, 1))
    target[1, 1] = [1, 0]
    target[1, 2] = [np.cos(0.1), np.sin(0.1)]  # nearly as good, to the right
    hard = match_keypoints(source, target, np.array([[0.5, 0.5]]), (1, 1), (3, 3))
    soft = match_keypoints(source, target, np.array([[0.5, 0.5]]), (1, 1), (3, 3), soft_argmax=True, window=1)
    np.testing.assert_allclose(hard, [[1.5, 1.5]])
    assert 1.5 < soft[0, 0] < 2.5 and soft[0, 1] == pytest.approx(1.5, abs=1e-3)


def _spair_tree(root: Path) -> None:
    """Two categories; each pair is a scene and its copy moved 2 patches right (wrapped)."""
    rng = np.random.default_rng(3)
    for category in ("cat", "dog"):
        (root / "JPEGImages" / category).mkdir(parents=True)
        image, _ = generate_scene(rng, size=(SIZE, SIZE))
        Image.fromarray(image).save(root / "JPEGImages" / category / "a.png")
        Image.fromarray(np.roll(image, 28, axis=1)).save(root / "JPEGImages" / category / "b.png")
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    kps = [[7, 7], [35, 49], [14, 70]]
    for category, shift in (("cat", 28), ("dog", 48)):  # dog's annotation is 20 px off the true move
        pair = {"category": category, "src_imname": "a.png", "trg_imname": "b.png", "src_kps": kps,
                "trg_kps": [[x + shift, y] for x, y in kps], "src_bndbox": [0, 0, 100, 60],
                "trg_bndbox": [0, 0, 100, 60]}  # fmt: skip
        (root / "PairAnnotation" / "test" / f"{category}.json").write_text(json.dumps(pair))


def test_run_on_spair_tree(tmp_path: Path, capsys) -> None:
    _spair_tree(tmp_path)
    cfg = KeypointConfig(data_root=tmp_path, input_size=SIZE, out=tmp_path / "kp.json")
    report = run_keypoints(cfg, PatchContentBackend())
    assert report["input_size"] == SIZE and f"(input {SIZE}x{SIZE} px)" in capsys.readouterr().out
    # cat: errors 0, 0, 9.9 -> 3/3 at 0.1, 2/3 at 0.05; dog: errors 20, 20, ~21 -> 0.
    assert report["pck@0.1"]["per_category"] == {"cat": 1.0, "dog": 0.0}
    assert report["pck@0.05"]["per_category"]["cat"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "kp.json").read_text())["num_pairs"] == 2
    assert [p.category for p in spair_pairs(tmp_path, "test", ["dog"])] == ["dog"]
    with pytest.raises(DatasetError, match="unknown SPair split"):
        spair_pairs(tmp_path, "dev")
    (tmp_path / "PairAnnotation" / "test" / "bad.json").write_text("{}")
    with pytest.raises(DatasetError, match="bad.json"):
        spair_pairs(tmp_path, "test")


def test_cli(random_artefact: Path, tmp_path: Path) -> None:
    _spair_tree(tmp_path)
    out = tmp_path / "kp.json"
    args = ["eval", "keypoints", "--data-root", str(tmp_path), "--model", str(random_artefact), "--device", "cpu"]
    assert main([*args, "--input-size", "56", "--soft-argmax", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["pck@0.1"]["mean"] <= 1.0 and report["keypoints"] == 6
