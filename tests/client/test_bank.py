"""MemoryBank building, bounds, search, and the on-disk format (round trip and every error)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neco.client import BankError, ContractError, IndexSpec, MemoryBank, SupportSetError
from neco.client.bank_io import FEATURES, MANIFEST, SOFT_LABELS
from neco.client.errors import BankContractError, BankCorruptError, BankVersionError
from neco.client.images import prepare_image, resize_mask
from neco.client.support import patch_soft_labels
from neco.contract import BANK_FORMAT_VERSION, ModelContract
from neco.scenes import write_scene_dataset

from .conftest import ColourBackend

CLASSES = ["background", "disc", "box", "triangle"]


def test_build_stores_unit_features_and_exact_soft_labels(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224, class_names=CLASSES, image_size=224, batch_size=3)
    assert len(bank) == 4 * 16 * 16 and bank.num_images == 4 and bank.class_names == CLASSES
    np.testing.assert_allclose(np.linalg.norm(bank.features, axis=1), 1, atol=1e-5)
    assert [shape[0] for shape in colour_backend.calls] == [3, 1]  # batched by batch_size
    # Independent check of the first image's rows: features from the backend, labels from the mask.
    image, mask = scenes_224[0]
    expected_feats = colour_backend.features([image])[0].reshape(-1, 384)
    expected_soft, _ = patch_soft_labels(mask.astype(np.int64), 14, 4, "scene 0")
    np.testing.assert_allclose(bank.features[:256], expected_feats, atol=1e-5)
    np.testing.assert_allclose(bank.soft_labels[:256], expected_soft, atol=1e-6)


def test_build_resizes_masks_with_images_and_checks_sizes(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224[:1], class_names=CLASSES, image_size=112)
    image, mask = scenes_224[0]
    prepared = prepare_image(image, 112, 14)
    expected, _ = patch_soft_labels(resize_mask(mask.astype(np.int64), prepared.size), 14, 4, "scene")
    np.testing.assert_allclose(bank.soft_labels, expected, atol=1e-6)
    with pytest.raises(SupportSetError, match="mask is 224x223 but the image is 224x224"):
        MemoryBank.build(colour_backend, [(image, mask[:, :223])])


def test_memory_size_bounds_the_bank_and_keeps_rare_classes(colour_backend, scenes_224) -> None:
    full = MemoryBank.build(colour_backend, scenes_224, class_names=CLASSES, image_size=224)
    small = MemoryBank.build(colour_backend, scenes_224, class_names=CLASSES, image_size=224, memory_size=200)
    assert len(small) == 4 * 50
    full_share = 1 - full.soft_labels[:, 0].mean()  # object (non-background) label mass
    small_share = 1 - small.soft_labels[:, 0].mean()
    assert small_share > 1.5 * full_share
    with pytest.raises(ValueError, match="patches_per_image"):
        MemoryBank.build(colour_backend, iter(scenes_224), memory_size=100)
    assert len(MemoryBank.build(colour_backend, iter(scenes_224), image_size=224, patches_per_image=7)) == 28


def test_ignore_only_patches_are_dropped_and_empty_support_fails(colour_backend) -> None:
    image = np.zeros((28, 28, 3), np.uint8)
    mask = np.full((28, 28), 255, np.uint8)
    mask[:14, :14] = 1
    bank = MemoryBank.build(colour_backend, [(image, mask)], class_names=["a", "b"], image_size=28)
    assert len(bank) == 1 and bank.soft_labels.tolist() == [[0.0, 1.0]]
    with pytest.raises(SupportSetError, match="empty"):
        MemoryBank.build(colour_backend, [])
    with pytest.raises(SupportSetError, match="ignore"):
        MemoryBank.build(colour_backend, [(image, np.full((28, 28), 255, np.uint8))], image_size=28)
    with pytest.raises(SupportSetError, match="beyond the 2 known classes"):
        MemoryBank.build(colour_backend, [(image, mask * 3)], class_names=["a", "b"], image_size=28)


def test_folder_support_with_class_names(colour_backend, tmp_path: Path) -> None:
    root = write_scene_dataset(tmp_path, splits={"train": 3}, size=(112, 112), num_classes=4, seed=0)
    bank = MemoryBank.build(colour_backend, root / "train", image_size=112)
    assert bank.class_names == json.loads((root / "classes.json").read_text())
    assert len(bank) == 3 * 64


def test_backend_with_wrong_feature_shape_is_rejected(scenes_224) -> None:
    backend = ColourBackend(ModelContract.for_arch("vit_base_patch14_dinov2"))
    backend.contract = ModelContract.for_arch("vit_small_patch14_dinov2")  # claims 384, returns 768
    with pytest.raises(ContractError, match="implies"):
        MemoryBank.build(backend, scenes_224[:1], image_size=224)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_round_trip(colour_backend, scenes_224, tmp_path: Path, kind: str, dtype: str) -> None:
    spec = IndexSpec(kind=kind, nlist=4, nprobe=4)
    bank = MemoryBank.build(colour_backend, scenes_224, class_names=CLASSES, image_size=224, dtype=dtype, index=spec)
    queries = colour_backend.features([scenes_224[1][0]])[0].reshape(-1, 384)
    sims, idx = bank.search(queries, 5)
    bank.save(tmp_path / "bank")
    assert (tmp_path / "bank" / "index.faiss").is_file() == (kind != "flat")
    loaded = MemoryBank.load(tmp_path / "bank", contract=colour_backend.contract)
    assert loaded.features.dtype == np.dtype(dtype) and loaded.class_names == CLASSES
    assert loaded.image_size == 224 and loaded.index_spec == spec and loaded.num_images == 4
    np.testing.assert_array_equal(loaded.features, bank.features)
    np.testing.assert_array_equal(loaded.soft_labels, bank.soft_labels)
    sims2, idx2 = loaded.search(queries, 5)
    np.testing.assert_allclose(sims2, sims, atol=1e-5)
    assert (idx2 == idx).mean() > 0.95  # ties between identical colours may swap order
    assert list((tmp_path).iterdir()) == [tmp_path / "bank"]  # no temp folders left behind


def test_flat_search_is_exact_inner_product(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224[:2], image_size=224, dtype="float16")
    queries = colour_backend.features([scenes_224[3][0]])[0].reshape(-1, 384)
    sims, idx = bank.search(queries, 3)
    brute = queries @ bank.features.astype(np.float32).T
    np.testing.assert_allclose(sims, np.sort(brute, axis=1)[:, ::-1][:, :3], atol=1e-4)


def test_append_extends_a_saved_bank(colour_backend, scenes_224, tmp_path: Path) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224[:2], class_names=CLASSES, image_size=224)
    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank", contract=colour_backend.contract)
    loaded.add(colour_backend, scenes_224[2:])
    loaded.save(tmp_path / "bank")
    again = MemoryBank.load(tmp_path / "bank")
    full = MemoryBank.build(colour_backend, scenes_224, class_names=CLASSES, image_size=224)
    np.testing.assert_array_equal(again.features, full.features)
    assert again.num_images == 4
    other = ColourBackend(ModelContract.for_arch("vit_small_patch14_dinov2"))
    with pytest.raises(BankError, match="cannot add"):
        again.add(other, scenes_224[:1])


@pytest.fixture
def saved_bank(colour_backend, scenes_224, tmp_path: Path) -> Path:
    MemoryBank.build(colour_backend, scenes_224[:2], class_names=CLASSES, image_size=224).save(tmp_path / "bank")
    return tmp_path / "bank"


def _edit_manifest(bank: Path, **changes: object) -> None:
    manifest = json.loads((bank / MANIFEST).read_text())
    manifest.update(changes)
    (bank / MANIFEST).write_text(json.dumps(manifest))


def test_load_refuses_other_contracts_and_newer_versions(saved_bank: Path) -> None:
    with pytest.raises(BankContractError, match="rebuild the bank"):
        MemoryBank.load(saved_bank, contract=ModelContract.for_arch("vit_small_patch14_reg4_dinov2", training_hash="x"))
    _edit_manifest(saved_bank, format_version=BANK_FORMAT_VERSION + 1)
    with pytest.raises(BankVersionError, match="upgrade"):
        MemoryBank.load(saved_bank)


def test_load_detects_corruption(saved_bank: Path, tmp_path: Path) -> None:
    data = bytearray((saved_bank / FEATURES).read_bytes())
    data[-1] ^= 0xFF
    (saved_bank / FEATURES).write_bytes(bytes(data))
    with pytest.raises(BankCorruptError, match="checksum"):
        MemoryBank.load(saved_bank)
    (saved_bank / SOFT_LABELS).unlink()
    with pytest.raises(BankCorruptError, match="missing soft_labels.npy"):
        MemoryBank.load(saved_bank, verify=False)
    (saved_bank / MANIFEST).write_text("{not json")
    with pytest.raises(BankCorruptError, match="not valid JSON"):
        MemoryBank.load(saved_bank)
    with pytest.raises(BankError, match="does not exist"):
        MemoryBank.load(tmp_path / "nowhere")


def test_pickled_arrays_are_refused_even_with_a_matching_checksum(saved_bank: Path) -> None:
    from neco.client.bank_io import sha256

    np.save(saved_bank / FEATURES, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    manifest = json.loads((saved_bank / MANIFEST).read_text())
    manifest["files"][FEATURES]["sha256"] = sha256(saved_bank / FEATURES)
    (saved_bank / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BankCorruptError, match="not a readable .npy"):
        MemoryBank.load(saved_bank)


def test_failed_save_leaves_the_old_bank_intact(saved_bank: Path, colour_backend, scenes_224, monkeypatch) -> None:
    before = (saved_bank / FEATURES).read_bytes()
    bigger = MemoryBank.build(colour_backend, scenes_224, class_names=CLASSES, image_size=224)
    import neco.atomic

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(neco.atomic, "fsync_path", explode)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(saved_bank)
    assert (saved_bank / FEATURES).read_bytes() == before
    assert sorted(p.name for p in saved_bank.parent.iterdir()) == ["bank"]  # temp folder removed
    with pytest.raises(BankError, match="refusing to overwrite"):
        other = saved_bank.parent / "other"
        other.mkdir()
        (other / "precious.txt").write_text("x")
        bigger.save(other)


def test_a_stray_label_does_not_become_two_hundred_classes(colour_backend, scenes_224) -> None:
    """Without a class list K is inferred from the largest label; a stray 200 is refused, not 201 classes."""
    image, mask = scenes_224[0]
    stray = mask.copy()
    stray[0, 0] = 200
    with pytest.raises(SupportSetError, match="largest mask label 200 would make 201 classes"):
        MemoryBank.build(colour_backend, [(image, stray)])
    with pytest.warns(UserWarning, match="classes inferred"):
        assert len(MemoryBank.build(colour_backend, [(image, mask)]).class_names) == int(mask.max()) + 1
    assert len(MemoryBank.build(colour_backend, [(image, stray)], num_classes=201).class_names) == 201
