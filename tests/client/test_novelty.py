"""Novelty (NECO and k-NN): PCA parity, invariances, separation, the default method, calibration, bank format,
segment, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.client import UNKNOWN_LABEL, BankError, MemoryBank, NecoClient, novelty, segment
from neco.client.bank import BankRows, BankSettings
from neco.client.bank_io import MANIFEST
from neco.client.errors import (
    BankContractError,
    BankCorruptError,
    NoveltyError,
    NoveltyNotCalibratedError,
    NoveltyNotFittedError,
)
from neco.client.novelty import DEFAULT_KNN_K, DEFAULT_METHOD, NOVELTY_FILES, NoveltyModel, NoveltySpec, calibrate
from neco.client.render import COLOUR_BAR_WIDTH, heat_colours
from neco.client.retrieval import calibrate_novelty
from neco.contract import BANK_FORMAT_VERSION, ModelContract
from neco.scenes import generate_scene

from .conftest import ColourBackend

CLASSES = ["background", "disc", "box", "triangle"]


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(novelty of an OOD sample > that of an ID sample), ties counted half: pair counting."""
    diff = np.asarray(out_scores)[:, None] - np.asarray(in_scores)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def low_rank_features(rng: np.random.Generator, count: int, basis: np.ndarray, noise: float = 0.05) -> np.ndarray:
    """Features near the span of `basis` (r, C), with a per-channel offset and scale."""
    coefficients = rng.standard_normal((count, basis.shape[0])) * np.linspace(3, 1, basis.shape[0])
    return coefficients @ basis + noise * rng.standard_normal((count, basis.shape[1]))


@pytest.fixture
def synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ID train, ID test, OOD) in 48-D: ID near a 6-D subspace, OOD mostly orthogonal to it."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((48, 48)))[0].T
    inside, outside = basis[:6], basis[6:]
    train = low_rank_features(rng, 2000, inside)
    test = low_rank_features(rng, 500, inside)
    ood = low_rank_features(rng, 500, inside) * 0.3 + rng.standard_normal((500, 42)) @ outside * 1.5
    return train, test, ood


def test_pca_fit_and_projection_match_an_independent_svd(synthetic) -> None:
    train, test, _ = synthetic
    train = train * np.linspace(0.5, 2, 48) + np.linspace(-1, 1, 48)  # channels of different scale and offset
    model = NoveltyModel.fit(train, NoveltySpec(dim=5))
    z = (train - train.mean(axis=0)) / train.std(axis=0)
    _, singular, vt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(model.mean, train.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.scale, train.std(axis=0), rtol=1e-5)
    # Components agree up to sign: compare the projectors onto the kept subspace.
    np.testing.assert_allclose(model.components.T @ model.components, vt[:5].T @ vt[:5], atol=1e-5)
    query = test[:50] * np.linspace(0.5, 2, 48) + np.linspace(-1, 1, 48)
    zq = (query - train.mean(axis=0)) / train.std(axis=0)
    expected = np.linalg.norm(zq @ vt[:5].T, axis=1) / np.linalg.norm(zq, axis=1)
    np.testing.assert_allclose(model.neco(query), expected, rtol=1e-4)
    np.testing.assert_allclose(model.novelty(query), 1 - expected, atol=1e-5)
    # d from the explained-variance threshold: the smallest d whose share reaches it.
    share = np.cumsum(singular**2) / (singular**2).sum()
    by_variance = NoveltyModel.fit(train, NoveltySpec(variance=0.8))
    assert by_variance.dim == int(np.argmax(share >= 0.8)) + 1
    assert by_variance.explained == pytest.approx(share[by_variance.dim - 1], rel=1e-6)


def test_score_is_invariant_to_feature_scale_and_offset(synthetic) -> None:
    train, test, ood = synthetic
    query = np.concatenate([test[:100], ood[:100]])
    base = NoveltyModel.fit(train, NoveltySpec(dim=6)).neco(query)
    assert ((base >= 0) & (base <= 1)).all()
    gain, offset = np.geomspace(0.01, 100, 48), np.linspace(-5, 5, 48)
    for transform in (lambda x: 7.5 * x, lambda x: x * gain + offset):
        moved = NoveltyModel.fit(transform(train), NoveltySpec(dim=6)).neco(transform(query))
        np.testing.assert_allclose(moved, base, atol=1e-4)


def test_ood_features_outside_the_subspace_are_separated(synthetic) -> None:
    train, test, ood = synthetic
    model = NoveltyModel.fit(train)  # d by the default explained-variance threshold
    assert model.dim <= 10
    assert auroc(model.novelty(test), model.novelty(ood)) >= 0.95


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.fixture
def unseen_mixtures() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ID train, ID test, unseen) unit features in 384-D, built like the benchmark's generated scenes.

    ID patches are 4 "colour" clusters plus a shared component of varying strength (a 5-D subspace
    and a little noise); unseen-class patches are mixtures of two seen colours without the shared
    component: inside the ID subspace, but far from every ID cluster.
    """
    rng = np.random.default_rng(4)
    axes = np.linalg.qr(rng.standard_normal((384, 5)))[0].T
    shared, colours = axes[0], axes[1:]

    def seen(count: int) -> np.ndarray:
        strength = rng.uniform(0.3, 2.0, (count, 1))
        return unit(strength * shared + colours[rng.integers(0, 4, count)] + 0.01 * rng.standard_normal((count, 384)))

    first = rng.integers(0, 4, 300)
    mixed = colours[first] + 0.8 * colours[(first + 1) % 4]
    return seen(3000), seen(300), unit(mixed + 0.01 * rng.standard_normal((300, 384)))


def test_neco_inverts_on_unseen_mixtures_and_the_default_method_does_not(colour_backend, unseen_mixtures) -> None:
    """The benchmark's failure, on synthetic features: NECO (computed here independently, as defined)
    ranks unseen patches inside the ID subspace as MORE in-distribution; the default method flags them."""
    train, test, unseen = unseen_mixtures
    z = (train - train.mean(axis=0)) / train.std(axis=0)
    _, singular, vt = np.linalg.svd(z, full_matrices=False)
    d = int(np.argmax(np.cumsum(singular**2) / (singular**2).sum() >= 0.9)) + 1
    assert d <= 5  # ID lies in a low-dimensional subspace

    def neco(queries: np.ndarray) -> np.ndarray:
        zq = (queries - train.mean(axis=0)) / train.std(axis=0)
        return np.linalg.norm(zq @ vt[:d].T, axis=1) / np.linalg.norm(zq, axis=1)

    model = NoveltyModel.fit(train)
    assert model.dim == d
    np.testing.assert_allclose(model.neco(unseen), neco(unseen), rtol=1e-4)
    assert auroc(1 - neco(test), 1 - neco(unseen)) < 0.1  # inverted: a property of the score, not of the code

    soft = np.eye(4, dtype=np.float32)[np.arange(len(train)) % 4]
    bank = MemoryBank(
        colour_backend.contract, BankRows(train.astype(np.float32), soft), BankSettings(class_names=CLASSES)
    )
    bank.fit_novelty()
    default_test, default_unseen = bank.patch_novelty(test), bank.patch_novelty(unseen)
    kth = np.sort(unseen @ train.T, axis=1)[:, -DEFAULT_KNN_K]  # independent k-NN: the k-th largest cosine
    np.testing.assert_allclose(default_unseen, 1 - kth, atol=1e-5)
    assert DEFAULT_METHOD == "knn" and auroc(default_test, default_unseen) > 0.99


def test_calibration_accepts_the_requested_share_of_held_out_images() -> None:
    rng = np.random.default_rng(3)

    def maps(count: int) -> list[np.ndarray]:  # per-image novelty maps with an image-level shift
        return [rng.gamma(2.0, 0.05, (8, 8)) + rng.gamma(2.0, 0.02) for _ in range(count)]

    held_out, fresh = maps(400), maps(4000)
    for aggregation in ("mean", 0.9):
        cal = calibrate(held_out, "neco", aggregation, acceptance=0.95)
        scores = np.array([np.mean(m) if aggregation == "mean" else np.quantile(m, 0.9) for m in held_out])
        assert (scores <= cal.image_threshold).mean() >= 0.95  # on the calibration images themselves
        assert (scores < cal.image_threshold).mean() < 0.95  # and it is the smallest such threshold
        fresh_scores = np.array([np.mean(m) if aggregation == "mean" else np.quantile(m, 0.9) for m in fresh])
        assert abs((fresh_scores <= cal.image_threshold).mean() - 0.95) < 0.03  # on other ID images
        patches = np.concatenate([m.ravel() for m in fresh])
        assert abs((patches <= cal.patch_threshold).mean() - 0.95) < 0.02
        assert cal.num_images == 400 and cal.num_patches == 400 * 64


@pytest.fixture
def scene_bank(colour_backend) -> MemoryBank:
    rng = np.random.default_rng(11)
    support = [generate_scene(rng, size=(112, 112), num_classes=4) for _ in range(12)]
    return MemoryBank.build(colour_backend, support, class_names=CLASSES, image_size=112, novelty=NoveltySpec())


def held_out_scenes(seed: int, count: int, num_classes: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, size=(112, 112), num_classes=num_classes)[0] for _ in range(count)]


def test_calibrated_decisions_on_scenes(colour_backend, scene_bank) -> None:
    calibration_images = held_out_scenes(21, 20)
    cals = calibrate_novelty(colour_backend, calibration_images, scene_bank, aggregation=0.95, acceptance=0.9)
    assert set(cals) == {"neco", "knn"} and scene_bank.novelty.calibrations == cals
    decisions = [novelty(colour_backend, image, scene_bank).is_novel for image in calibration_images]
    assert sum(not d for d in decisions) >= 18  # >= 90% of the calibration images accepted
    result = novelty(colour_backend, calibration_images[0], scene_bank)
    assert result.scores.shape == (112, 112) and result.patch_scores.shape == (8, 8)
    assert result.aggregation == 0.95 and result.score == pytest.approx(np.quantile(result.patch_scores, 0.95))
    with pytest.raises(NoveltyNotCalibratedError, match="aggregation 0.95"):
        novelty(colour_backend, calibration_images[0], scene_bank, aggregation="mean")
    with pytest.raises(NoveltyNotCalibratedError, match="k=10"):
        novelty(colour_backend, calibration_images[0], scene_bank, method="knn", k=3)


def test_knn_baseline_is_the_kth_neighbour_cosine_distance(colour_backend, scene_bank) -> None:
    image = held_out_scenes(5, 1)[0]
    result = novelty(colour_backend, image, scene_bank, method="knn", k=4)
    query = colour_backend.features([image])[0].reshape(-1, 384)
    sims = np.sort(query @ scene_bank.features.T, axis=1)[:, ::-1]
    np.testing.assert_allclose(result.patch_scores.ravel(), 1 - sims[:, 3], atol=1e-5)
    assert result.is_novel is None and result.threshold is None  # no calibration yet


@pytest.mark.parametrize("method", ["knn", "neco"])
def test_segment_marks_novel_pixels_unknown_aligned_with_the_novelty_map(colour_backend, scene_bank, method) -> None:
    calibrate_novelty(colour_backend, held_out_scenes(21, 20), scene_bank, methods=(method,), acceptance=0.95)
    image, _ = generate_scene(np.random.default_rng(2), size=(112, 112), num_classes=4)
    image[28:84, 28:84] = (255, 0, 255)  # a colour no support scene holds
    plain = segment(colour_backend, image, scene_bank)
    marked = segment(colour_backend, image, scene_bank, unknown=method)  # unknown= names the method
    assert marked.class_names == [*CLASSES, UNKNOWN_LABEL]
    result = novelty(colour_backend, image, scene_bank, method=method)
    assert result.method == method
    novel = result.scores > scene_bank.novelty.calibrations[method].patch_threshold
    np.testing.assert_array_equal(marked.mask == 4, novel)  # the same pixel grid as the map
    np.testing.assert_array_equal(marked.mask[~novel], plain.mask[~novel])
    outside = np.ones_like(novel)
    outside[14:98, 14:98] = False  # a patch away from the square
    assert novel[35:77, 35:77].mean() > 0.95 and novel[outside].mean() < 0.1
    assert result.is_novel
    if method == DEFAULT_METHOD:  # True and a bare threshold mean the default method
        np.testing.assert_array_equal(segment(colour_backend, image, scene_bank, unknown=True).mask, marked.mask)
        assert novelty(colour_backend, image, scene_bank).method == method
    explicit = segment(colour_backend, image, scene_bank, unknown=2.0)  # 1 - cosine never exceeds 2
    np.testing.assert_array_equal(explicit.mask, plain.mask)


def test_bank_save_load_keeps_the_subspace_and_calibrations(colour_backend, scene_bank, tmp_path: Path) -> None:
    calibrate_novelty(colour_backend, held_out_scenes(21, 6), scene_bank)
    scene_bank.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / MANIFEST).read_text())
    assert manifest["format_version"] == BANK_FORMAT_VERSION == 2
    assert set(NOVELTY_FILES.values()) <= set(manifest["files"])  # checksummed like the other files
    loaded = MemoryBank.load(tmp_path / "bank")
    for key in NOVELTY_FILES:
        np.testing.assert_array_equal(getattr(loaded.novelty, key), getattr(scene_bank.novelty, key))
    assert loaded.novelty.calibrations == scene_bank.novelty.calibrations
    assert loaded.novelty.spec == scene_bank.novelty.spec and loaded.novelty.dim == scene_bank.novelty.dim
    image = held_out_scenes(9, 1)[0]
    before, after = novelty(colour_backend, image, scene_bank), novelty(colour_backend, image, loaded)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert before.is_novel == after.is_novel and before.threshold == after.threshold
    components = tmp_path / "bank" / NOVELTY_FILES["components"]
    data = bytearray(components.read_bytes())
    data[-1] ^= 0xFF
    components.write_bytes(bytes(data))
    with pytest.raises(BankCorruptError, match="checksum"):
        MemoryBank.load(tmp_path / "bank")


def test_version_1_bank_loads_and_neco_asks_for_a_refit(colour_backend, scenes_224, tmp_path: Path) -> None:
    MemoryBank.build(colour_backend, scenes_224, class_names=CLASSES, image_size=224).save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / MANIFEST).read_text())
    manifest["format_version"] = 1
    del manifest["novelty"]  # what a version-1 writer produced
    (tmp_path / "bank" / MANIFEST).write_text(json.dumps(manifest))
    bank = MemoryBank.load(tmp_path / "bank")
    assert bank.novelty is None
    image = scenes_224[0][0]
    with pytest.raises(NoveltyNotFittedError, match="format version 2.*fit_novelty"):
        novelty(colour_backend, image, bank, method="neco")
    with pytest.raises(NoveltyNotFittedError):
        segment(colour_backend, image, bank, unknown=True)
    assert novelty(colour_backend, image, bank).scores.shape == (224, 224)  # the default, k-NN, needs no fit
    bank.fit_novelty(NoveltySpec(dim=3))
    assert bank.novelty.dim == 3 and novelty(colour_backend, image, bank, method="neco").scores.shape == (224, 224)
    with pytest.raises(NoveltyNotCalibratedError, match="calibrate_novelty"):
        segment(colour_backend, image, bank, unknown=True)


def test_bad_input_gets_typed_errors(colour_backend, scene_bank) -> None:
    rows = BankRows(scene_bank.features[:5], scene_bank.soft_labels[:5])
    small = MemoryBank(colour_backend.contract, rows, scene_bank.settings)
    with pytest.raises(NoveltyError, match="holds 5 patches.*needs at least 11"):
        small.fit_novelty(NoveltySpec(dim=10))
    with pytest.raises(NoveltyError, match="d=400 exceeds the feature width 384"):
        scene_bank.fit_novelty(NoveltySpec(dim=400))
    assert issubclass(NoveltyError, BankError)
    with pytest.raises(ValueError):
        NoveltySpec(variance=1.5)
    image = held_out_scenes(1, 1)[0]
    with pytest.raises(NoveltyError, match="aggregation must be"):
        novelty(colour_backend, image, scene_bank, aggregation="median")
    with pytest.raises(NoveltyError, match="method must be"):
        novelty(colour_backend, image, scene_bank, method="mahalanobis")
    with pytest.raises(NoveltyError, match="acceptance"):
        calibrate_novelty(colour_backend, [image], scene_bank, acceptance=1.0)
    with pytest.raises(NoveltyError, match="at least one"):
        calibrate_novelty(colour_backend, [], scene_bank)
    other = ColourBackend(ModelContract.for_arch("vit_small_patch14_dinov2"))
    with pytest.raises(BankContractError, match="rebuild the bank"):
        calibrate_novelty(other, [image], scene_bank)
    with pytest.raises(NoveltyNotCalibratedError, match="knn calibration.*calibrate_novelty"):
        segment(colour_backend, image, scene_bank, unknown=True)
    with pytest.raises(NoveltyError, match="method among"):
        segment(colour_backend, image, scene_bank, unknown="mahalanobis")
    named_settings = BankSettings(class_names=[*CLASSES[:3], "unknown"], image_size=scene_bank.image_size)
    named = MemoryBank(colour_backend.contract, scene_bank.rows, named_settings)
    with pytest.raises(BankError, match="already has a class named 'unknown'"):
        segment(colour_backend, image, named, unknown=0.5)


def test_add_refits_the_subspace_and_drops_stale_calibrations(colour_backend, scene_bank, scenes_224) -> None:
    calibrate_novelty(colour_backend, held_out_scenes(21, 4), scene_bank)
    scene_bank.add(colour_backend, scenes_224[:1])
    refit = NoveltyModel.fit(scene_bank.features, scene_bank.novelty.spec)
    np.testing.assert_allclose(scene_bank.novelty.components, refit.components)
    assert scene_bank.novelty.calibrations == {}


class FakeClient(ColourBackend):
    """What the CLI gets from `_client`: a colour backend with NecoClient's own methods."""

    size = 112
    novelty = NecoClient.novelty
    segment = NecoClient.segment

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_cli_fits_calibrates_and_writes_the_overlay(scene_bank, tmp_path: Path, monkeypatch, capsys) -> None:
    import neco.client.cli as cli

    monkeypatch.setattr(cli, "_client", lambda args: FakeClient())
    MemoryBank(scene_bank.contract, scene_bank.rows, scene_bank.settings).save(tmp_path / "bank")  # no NECO fit
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for i, image in enumerate(held_out_scenes(21, 8)):
        Image.fromarray(image).save(held_out / f"{i}.png")
    argv = ["bank", "novelty", str(tmp_path / "bank"), "--calibrate", str(held_out), "--aggregate", "0.9"]
    assert cli.main(argv) == 0
    assert set(MemoryBank.load(tmp_path / "bank").novelty.calibrations) == {"neco", "knn"}

    image = held_out_scenes(4, 1, num_classes=6)[0][:, :100]  # 112 x 100: not square, not a patch multiple
    Image.fromarray(image).save(tmp_path / "query.png")
    for method in ("neco", "knn"):
        out = tmp_path / f"map_{method}.png"
        assert (
            cli.main(
                [
                    "novelty",
                    str(tmp_path / "query.png"),
                    "--bank",
                    str(tmp_path / "bank"),
                    "--out",
                    str(out),
                    "--method",
                    method,
                ]
            )
            == 0
        )
        assert f"{method} novelty" in capsys.readouterr().out
        picture = np.asarray(Image.open(out).convert("RGB"))
        assert picture.shape == (112, 100 + COLOUR_BAR_WIDTH, 3)
        assert not np.array_equal(picture[:, :100], image)  # the heat map is blended in
        np.testing.assert_array_equal(picture[0, 106], heat_colours(np.array(1.0)))  # bar: top = high
        np.testing.assert_array_equal(picture[-1, 106], heat_colours(np.array(0.0)))  # bottom = low
    assert cli.main(["bank", "info", str(tmp_path / "bank")]) == 0
    assert "NoveltyModel(d=" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "novelty",
                str(tmp_path / "query.png"),
                "--bank",
                str(tmp_path / "bank"),
                "--out",
                str(tmp_path / "x.png"),
                "--aggregate",
                "mean",
            ]
        )
        == 2
    )
    assert "recalibrate" in capsys.readouterr().err
