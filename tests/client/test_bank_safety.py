"""Issue 14 (items 4 and 8): saving never destroys foreign files; loading refuses hostile banks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from neco.client import BankError, MemoryBank, SupportSetError
from neco.client.bank import BankRows, BankSettings
from neco.client.bank_io import FEATURES, INDEX, MANIFEST, SOFT_LABELS, sha256
from neco.client.errors import BankCorruptError, BankVersionError
from neco.contract import ModelContract

from .conftest import ARCH

CLASSES = ["background", "disc", "box", "triangle"]


def _bank(rows: int = 40, seed: int = 0, kind: str = "flat") -> MemoryBank:
    from neco.client import IndexSpec

    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rows, 384)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    soft = np.eye(4, dtype=np.float32)[rng.integers(0, 4, rows)]
    spec = IndexSpec(kind=kind, nlist=1)
    settings = BankSettings(class_names=CLASSES, index=spec)
    return MemoryBank(ModelContract.for_arch(ARCH), BankRows(features, soft, num_images=rows // 10), settings)


def test_a_folder_with_a_foreign_manifest_is_refused_and_left_intact(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"name": "my web app", "version": 3}))
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "x.csv").write_text("1,2")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(BankError, match="refusing to overwrite"):
        _bank().save(folder)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no staging folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(BankError, match="not a folder"):
        _bank().save(tmp_path / "file")


def test_save_accepts_absent_empty_and_own_bank_folders(tmp_path: Path) -> None:
    _bank().save(tmp_path / "new" / "bank")
    (tmp_path / "empty").mkdir()
    _bank().save(tmp_path / "empty")
    _bank(seed=1).save(tmp_path / "empty")  # replacing our own bank
    loaded = MemoryBank.load(tmp_path / "empty")
    np.testing.assert_array_equal(loaded.features, _bank(seed=1).features)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


def test_replacing_a_bank_never_leaves_the_path_without_a_whole_bank(tmp_path: Path) -> None:
    """A reader polling during many replacements always finds a complete, loadable bank."""
    path = tmp_path / "bank"
    banks = [_bank(seed=s) for s in range(2)]
    expected = [b.features for b in banks]
    banks[0].save(path)
    stop, failures, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                loaded = MemoryBank.load(path)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(exc))
                continue
            reads[0] += 1
            if not any(np.array_equal(loaded.features, e) for e in expected):
                failures.append("mixed bank")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            banks[i % 2].save(path)
    finally:
        stop.set()
        thread.join()
    assert reads[0] > 0 and failures == []


@pytest.mark.parametrize("version", [0, -1, True, "2", 1.5, None])
def test_bad_format_versions_are_refused(tmp_path: Path, version: object) -> None:
    _bank().save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / MANIFEST).read_text())
    manifest["format_version"] = version
    (tmp_path / "bank" / MANIFEST).write_text(json.dumps(manifest))
    expected = BankVersionError if type(version) is int else BankCorruptError
    with pytest.raises(expected, match="version"):
        MemoryBank.load(tmp_path / "bank")


def _rewrite(bank: Path, name: str, array: np.ndarray) -> None:
    """Replace one array and fix its checksum, as an attacker (or a buggy writer) would."""
    np.save(bank / name, array, allow_pickle=False)
    manifest = json.loads((bank / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": sha256(bank / name), "bytes": (bank / name).stat().st_size}
    (bank / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", [FEATURES, SOFT_LABELS])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_are_refused(tmp_path: Path, name: str, value: float) -> None:
    bank = _bank()
    bank.save(tmp_path / "bank")
    array = (bank.features if name == FEATURES else bank.soft_labels).copy()
    array[3, 1] = value
    _rewrite(tmp_path / "bank", name, array)
    with pytest.raises(BankCorruptError, match="NaN or infinite"):
        MemoryBank.load(tmp_path / "bank")
    with pytest.raises(BankError, match="finite"):
        MemoryBank(bank.contract, BankRows(np.full_like(bank.features, np.nan), bank.soft_labels), bank.settings)


def test_crafted_index_file_is_a_typed_error(tmp_path: Path) -> None:
    bank = _bank(rows=400, kind="hnsw")
    bank.save(tmp_path / "bank")
    data = bytearray((tmp_path / "bank" / INDEX).read_bytes())
    data[8:16] = (2**62).to_bytes(8, "little")  # ntotal field of the header: an absurd allocation
    (tmp_path / "bank" / INDEX).write_bytes(bytes(data))
    manifest = json.loads((tmp_path / "bank" / MANIFEST).read_text())
    manifest["files"][INDEX]["sha256"] = sha256(tmp_path / "bank" / INDEX)
    (tmp_path / "bank" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BankCorruptError):
        MemoryBank.load(tmp_path / "bank")


def test_without_a_class_list_k_is_inferred_loudly_and_recorded(colour_backend, tmp_path: Path) -> None:
    image = np.zeros((28, 28, 3), np.uint8)
    mask = np.zeros((28, 28), np.uint8)
    mask[:14] = 200  # one stray label: refused (most of 201 inferred classes never occur)
    with pytest.raises(SupportSetError, match="would make 201 classes, but only 2 distinct labels occur"):
        MemoryBank.build(colour_backend, [(image, mask)], image_size=28)
    dense = np.repeat(np.arange(4, dtype=np.uint8), 7)[:, None].repeat(28, axis=1)  # labels 0..3, all present
    with pytest.warns(UserWarning, match="4 classes inferred"):
        bank = MemoryBank.build(colour_backend, [(image, dense)], image_size=28)
    assert len(bank.class_names) == 4 and bank.classes_inferred
    bank.save(tmp_path / "bank")
    assert json.loads((tmp_path / "bank" / MANIFEST).read_text())["classes_inferred"] is True
    assert MemoryBank.load(tmp_path / "bank").classes_inferred
    with pytest.raises(SupportSetError, match="beyond the 4 known classes"):
        MemoryBank.build(colour_backend, [(image, mask)], image_size=28, num_classes=4)
    fixed = MemoryBank.build(colour_backend, [(image, mask % 4)], image_size=28, num_classes=4)
    assert fixed.class_names == ["class_0", "class_1", "class_2", "class_3"] and not fixed.classes_inferred
    with pytest.raises(SupportSetError, match="num_classes=3"):
        MemoryBank.build(colour_backend, [(image, mask % 4)], class_names=CLASSES, num_classes=3)
