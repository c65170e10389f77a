"""Issue 34 (items 3, 8, 9, 10) and issue 27.4: bank manifests are validated models, writers
exclude each other, dead writers' staging folders are cleaned, conflicts name the bank."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import neco.client.bank_io as bank_io
from neco.atomic import STALE_AFTER_S, remove_stale_staging, staged_directory
from neco.client import BankError, MemoryBank
from neco.client.bank_io import MANIFEST, writer_lock
from neco.client.errors import BankBusyError, BankContractError, BankCorruptError
from neco.contract import ModelContract

from .conftest import ColourBackend

CLASSES = ["background", "disc", "box", "triangle"]
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bank_v2"


def _edit_manifest(bank: Path, edit) -> None:
    manifest = json.loads((bank / MANIFEST).read_text())
    edit(manifest)
    (bank / MANIFEST).write_text(json.dumps(manifest))


def _set(section: str | None, key: str, value: object):
    def edit(manifest: dict) -> None:
        (manifest[section] if section else manifest)[key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_set(None, "image_size", "abc"), "image_size"),
        (_set(None, "image_size", [0, 0]), "image_size"),
        (_set(None, "image_size", -448), "image_size"),
        (_set(None, "image_size", 448.5), "image_size"),
        (_set(None, "image_size", True), "image_size"),
        (_set("counts", "images", -5), "counts.images"),
        (_set("counts", "patches", 3), "3"),
        (_set(None, "class_names", "abcd"), "class_names"),
        (_set(None, "class_names", ["a", 1, "b", "c"]), "class_names"),
        (_set(None, "dtype", "int8"), "dtype"),
        (_set(None, "classes_inferred", "yes"), "classes_inferred"),
        (_set("index", "kind", "lsh"), "index.kind"),
    ],
)
def test_a_malformed_manifest_is_a_corrupt_bank_for_load_and_bank_info(
    colour_backend, scenes_224, tmp_path: Path, capsys, edit, field: str
) -> None:
    import neco.client.cli as cli

    bank = tmp_path / "bank"
    MemoryBank.build(colour_backend, scenes_224[:2], class_names=CLASSES, image_size=56).save(bank)
    _edit_manifest(bank, edit)
    with pytest.raises(BankCorruptError, match=field):
        MemoryBank.load(bank)
    assert cli.main(["bank", "info", str(bank)]) == 2
    assert field in capsys.readouterr().err


def test_banks_written_before_the_manifest_model_load_and_save_the_same_manifest(tmp_path: Path) -> None:
    """tests/fixtures/bank_v2 was written by the hand-built manifest code: it must keep loading,
    and saving it again must produce the same manifest (the format did not change)."""
    bank = MemoryBank.load(FIXTURE)
    assert repr(bank) == "MemoryBank(24 patches x 384 (float16), 3 classes, 3 images, index=flat)"
    assert bank.class_names == ["sky", "road", "car"] and bank.image_size == (56, 84)
    assert bank.novelty is not None and bank.novelty.dim == 2 and set(bank.novelty.calibrations) == {"neco"}
    np.testing.assert_array_equal(bank.image_ids, np.repeat(np.arange(3), 8))
    bank.save(tmp_path / "again")
    saved, old = (json.loads((folder / MANIFEST).read_text()) for folder in (tmp_path / "again", FIXTURE))
    new_contract, old_contract = saved.pop("contract"), old.pop("contract")
    assert saved == old  # the format did not change
    # the contract gained fields since (family, position ...), filled from the architecture registry
    assert {key: new_contract[key] for key in old_contract} == old_contract and set(new_contract) > set(old_contract)


def test_a_contract_conflict_names_the_bank_not_the_server_path(colour_backend, scenes_224, tmp_path: Path) -> None:
    folder = tmp_path / "srv" / "banks" / "scenes"
    MemoryBank.build(colour_backend, scenes_224[:1], class_names=CLASSES, image_size=56).save(folder)
    other = ModelContract.for_arch("vit_base_patch14_dinov2")
    with pytest.raises(BankContractError, match="memory bank 'scenes' was built with") as info:
        MemoryBank.load(folder, contract=other)
    assert str(tmp_path) not in str(info.value)


class SlowClient(ColourBackend):
    """What `neco bank append` gets from `_client`: slow enough that two appends overlap."""

    size = 56

    def features(self, images):
        time.sleep(0.2)
        return super().features(images)

    def __enter__(self) -> SlowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _support_folder(root: Path, pairs: list) -> Path:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i, (image, mask) in enumerate(pairs):
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


def _append(bank: Path, support: Path) -> None:
    import neco.client.cli as cli

    os._exit(cli.main(["bank", "append", str(bank), str(support)]))


def test_concurrent_appends_lose_no_image(scenes_224, tmp_path: Path, monkeypatch) -> None:
    """Two `neco bank append` at once, 10 rounds: both succeed and the bank holds every image."""
    import neco.client.cli as cli

    monkeypatch.setattr(cli, "_client", lambda args: SlowClient())
    supports = [_support_folder(tmp_path / f"support{i}", scenes_224[2 * i : 2 * i + 2]) for i in range(2)]
    fork = multiprocessing.get_context("fork")
    for round_ in range(10):
        bank = tmp_path / f"bank{round_}"
        MemoryBank.build(SlowClient(), scenes_224[:1], class_names=CLASSES, image_size=56).save(bank)
        writers = [fork.Process(target=_append, args=(bank, support)) for support in supports]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        assert [w.exitcode for w in writers] == [0, 0]
        loaded = MemoryBank.load(bank)
        assert loaded.num_images == 5 and np.unique(loaded.image_ids).size == 5, f"round {round_}: {loaded!r}"
        assert len(loaded) == 5 * (56 // 14) ** 2


def test_a_writer_that_cannot_get_the_lock_in_time_says_who_holds_it(
    scenes_224, tmp_path: Path, monkeypatch, capsys
) -> None:
    import neco.client.cli as cli

    monkeypatch.setattr(cli, "_client", lambda args: SlowClient())
    monkeypatch.setattr(bank_io, "LOCK_WAIT_S", 0.3)
    bank = tmp_path / "bank"
    MemoryBank.build(SlowClient(), scenes_224[:1], class_names=CLASSES, image_size=56).save(bank)
    support = _support_folder(tmp_path / "support", scenes_224[1:2])
    fork = multiprocessing.get_context("fork")
    with writer_lock(bank):  # held by this process, as by a concurrent `neco bank build`
        writer = fork.Process(target=_append, args=(bank, support))
        writer.start()
        writer.join(30)
        assert writer.exitcode == 2
        with ThreadPoolExecutor(1) as pool:  # another thread of this process waits too (reentrant per thread)
            other = pool.submit(lambda: MemoryBank.updating(bank).__enter__())
            with pytest.raises(BankBusyError, match=f"bank 'bank' is being written by PID {os.getpid()}"):
                other.result()
    assert MemoryBank.load(bank).num_images == 1  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "support"]  # the lock file went with its holder


def _die_while_saving(bank: MemoryBank, path: Path) -> None:
    def write_then_die(folder: Path, files) -> None:
        np.save(folder / "features.npy", files.features)
        os.kill(os.getpid(), signal.SIGKILL)

    bank_io._write_files = write_then_die
    bank.save(path)


def test_the_next_write_removes_staging_folders_of_killed_writers(colour_backend, scenes_224, tmp_path: Path) -> None:
    path = tmp_path / "bank"
    bank = MemoryBank.build(colour_backend, scenes_224[:1], class_names=CLASSES, image_size=56)
    bank.save(path)
    fork = multiprocessing.get_context("fork")
    for _ in range(3):  # kill -9 in the middle of writing, three times
        writer = fork.Process(target=_die_while_saving, args=(bank, path))
        writer.start()
        writer.join(30)
        assert writer.exitcode == -signal.SIGKILL
    stale = sorted(tmp_path.glob(".bank.staging-*"))
    assert len(stale) == 3 and MemoryBank.load(path).num_images == 1  # the old bank is whole
    old = time.time() - 2 * STALE_AFTER_S
    for folder in stale:
        os.utime(folder, (old, old))
    bank.save(path)  # the next write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no staging folder, no lock file
    assert MemoryBank.load(path).num_images == 1
    with staged_directory(path, replace=True) as live:
        os.utime(live, (old, old))
        assert remove_stale_staging(path, min_age_s=0) == [] and live.is_dir()  # a live writer's folder stays
        shutil.copytree(path, live, dirs_exist_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


def test_updating_a_missing_bank_creates_no_folder_and_no_lock_file(tmp_path: Path) -> None:
    for missing in (tmp_path / "no" / "bank", tmp_path / "bank"):
        with pytest.raises(BankError, match="does not exist"):
            with MemoryBank.updating(missing):
                pass
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_cannot_point_novelty_arrays_outside_the_bank(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(FIXTURE, bank)
    shutil.copy(bank / "novelty_mean.npy", tmp_path / "outside.npy")  # a valid array, checksum and all

    def point_outside(manifest: dict) -> None:
        manifest["novelty"]["files"]["mean"] = "../outside.npy"
        manifest["files"]["../outside.npy"] = manifest["files"]["novelty_mean.npy"]

    _edit_manifest(bank, point_outside)
    with pytest.raises(BankCorruptError, match="novelty entry names files"):
        MemoryBank.load(bank)
