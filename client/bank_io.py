"""On-disk memory-bank format: a folder of .npy arrays + a JSON manifest, no pickle.

Layout (format version `BANK_FORMAT_VERSION`)::

    BANK/manifest.json     format, version, contract, class names, counts, dtype, image size,
                           index spec, and {file: {sha256, bytes}} for every data file
    BANK/features.npy      (N, C) float16|float32, unit-norm rows
    BANK/soft_labels.npy   (N, K) same dtype, rows sum to 1
    BANK/image_ids.npy     (N,) int64 support-image index of every row (delete by image, shard merge);
                           optional, banks written before it load with ids unknown
    BANK/index.faiss       only for trained indexes (IVF/HNSW), via faiss.write_index
    BANK/novelty_*.npy     since version 2, only for banks with a fitted NECO subspace
                           (`novelty.NoveltyModel.save`; its manifest entry is "novelty")

Version 1 banks (no "novelty" entry) load unchanged; NECO then needs a refit.

A flat index is not written: it is a float32 copy of features.npy, rebuilt in one memcpy,
and storing it would triple the bytes of an fp16 bank.

Writing never destroys what this project did not write: the destination must be absent, an
empty folder, or a bank (a manifest whose `format` is ours); anything else is refused before a
byte is written. The new bank is staged in a hidden sibling folder and swapped with the old one
in a single `renameat2(RENAME_EXCHANGE)` on Linux (`neco.atomic.publish_directory`), so at every
instant the path holds a whole bank, old or new (elsewhere the old one is renamed aside first).

Stale staging folders of writers that died (kill -9 during `neco bank build`) are removed by the
next write to the same bank (`neco.atomic.staged_directory`).

Reading trusts nothing: format versions must be integers in 1..`BANK_FORMAT_VERSION`, the
manifest must validate as a `BankManifest` (positive image sizes, non-negative counts, a list
of class names, ...), checksums must match, arrays are read with `allow_pickle=False` and must
be finite and agree with the manifest (dtype, row count), and a faiss index that cannot be
parsed (including one whose header asks for absurd allocations) is `BankCorruptError`.

This module knows files, not `MemoryBank`: `bank.py` turns a bank into `BankFiles` and back,
so the dependency runs one way (bank -> bank_io).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from pydantic import ValidationError

from neco.atomic import staged_directory
from neco.client.bank_manifest import FORMAT_NAME, BankCounts, BankManifest, BankSettings, FileEntry
from neco.client.errors import BankBusyError, BankCorruptError, BankError, BankVersionError
from neco.client.novelty import NoveltyModel
from neco.contract import BANK_FORMAT_VERSION, ModelContract

MANIFEST = "manifest.json"
FEATURES = "features.npy"
SOFT_LABELS = "soft_labels.npy"
INDEX = "index.faiss"
IMAGE_IDS = "image_ids.npy"
LOCK_WAIT_S = 30.0
"""How long a writer waits for another writer of the same bank before `BankBusyError`."""

_held = threading.local()  # lock files this thread holds: the lock is reentrant within a thread


@dataclass
class BankFiles:
    """What a bank folder holds: its contract, settings and image count, and the decoded data files."""

    contract: ModelContract
    settings: BankSettings
    num_images: int
    features: np.ndarray
    soft_labels: np.ndarray
    index: faiss.Index | None = None
    """Only for trained indexes (IVF/HNSW); a flat index is rebuilt from the features."""
    novelty: NoveltyModel | None = None
    """The fitted NECO subspace (`novelty.py` writes and reads its own .npy files)."""
    image_ids: np.ndarray | None = None
    """(N,) int64 support-image index of each row; None for banks written without it."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_bank_folder(path: Path) -> bool:
    """True when `path/manifest.json` declares this project's bank format (content not checked)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def check_writable(path: Path) -> None:
    """Refuse a destination that holds anything this project did not write as a bank."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BankError(f"{str(path)!r} exists and is not a folder; refusing to overwrite it")
    if path.is_dir() and any(path.iterdir()) and not is_bank_folder(path):
        raise BankError(
            f"{str(path)!r} is not empty and is not a {FORMAT_NAME} folder (no manifest.json of that format); "
            "refusing to overwrite it: choose an empty or new folder"
        )


@contextmanager
def writer_lock(path: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the exclusive writer lock of bank `path`: `flock` on the file `.NAME.lock` beside it.

    Every write of a bank takes it, and a read-modify-write (`MemoryBank.updating`) holds it
    throughout, so two writers never interleave. It is reentrant within a thread and dies with
    its process (kill -9 included). After `wait_s` (`LOCK_WAIT_S`) seconds of waiting: `BankBusyError` naming
    the bank (not its path) and the PID of the writer. The holder deletes the file when done,
    so a waiter that locked a file no longer at that path starts again on the new one.
    """
    lock_path = Path(os.path.abspath(path.parent / f".{path.name}.lock"))
    key = (os.getpid(), lock_path)  # a forked child does not inherit its parent's lock
    held: set[tuple[int, Path]] = _held.__dict__.setdefault("keys", set())
    if key in held:
        yield
        return
    if not lock_path.parent.is_dir():
        raise BankError(f"memory bank {str(path)!r} does not exist")
    deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if _try_lock(fd) and _same_file(fd, lock_path):
            break
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if time.monotonic() >= deadline:
            raise BankBusyError(f"bank {path.name!r} is being written by PID {owner}; try again later")
        time.sleep(0.05)
    try:
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        held.add(key)
        yield
    finally:
        held.discard(key)
        lock_path.unlink(missing_ok=True)  # still ours: no one else holds a lock on this path
        os.close(fd)  # releases the flock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """True when `path` still names the file open as `fd` (a holder may have deleted it meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def write_bank(path: Path, files: BankFiles) -> Path:
    """Write `files` to folder `path` atomically, under its writer lock; only an existing bank is replaced."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path):
        # checked again just before the swap: the folder may have changed while the arrays were written
        with staged_directory(path, replace=True, before_publish=lambda: check_writable(path)) as staging:
            _write_files(staging, files)
    return path


def _write_files(folder: Path, files: BankFiles) -> None:
    np.save(folder / FEATURES, np.ascontiguousarray(files.features), allow_pickle=False)
    np.save(folder / SOFT_LABELS, np.ascontiguousarray(files.soft_labels), allow_pickle=False)
    names = [FEATURES, SOFT_LABELS]
    if files.image_ids is not None:
        np.save(folder / IMAGE_IDS, np.ascontiguousarray(files.image_ids, dtype=np.int64), allow_pickle=False)
        names.append(IMAGE_IDS)
    if files.index is not None:
        faiss.write_index(files.index, str(folder / INDEX))
        names.append(INDEX)
    novelty = files.novelty.save(folder) if files.novelty is not None else None
    if novelty is not None:
        names += list(novelty.files.values())
    counts = BankCounts(
        patches=len(files.features),
        images=files.num_images,
        class_mass=[round(float(v), 4) for v in files.soft_labels.astype(np.float64).sum(axis=0)],
    )
    manifest = BankManifest(
        **dict(files.settings),
        contract=files.contract,
        counts=counts,
        novelty=novelty,
        files={name: FileEntry(sha256=sha256(folder / name), bytes=(folder / name).stat().st_size) for name in names},
    )
    (folder / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))


def read_manifest(path: Path) -> BankManifest:
    """The manifest of a bank folder, with its format and version checked and its fields validated."""
    if not path.is_dir():
        raise BankError(f"memory bank {str(path)!r} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BankCorruptError(f"{str(path)!r} has no {MANIFEST}; not a memory bank (or a partial write)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankCorruptError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BankCorruptError(f"{manifest_path} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if type(version) is not int:  # bool is an int subclass: `true` is not a version
        raise BankCorruptError(f"{manifest_path} lacks an integer format_version (got {version!r})")
    if version < 1:
        raise BankVersionError(f"{str(path)!r} declares bank format version {version}; versions start at 1")
    if version > BANK_FORMAT_VERSION:
        raise BankVersionError(
            f"{str(path)!r} has bank format version {version}; this client reads up to "
            f"{BANK_FORMAT_VERSION}: upgrade neco-dense"
        )
    try:
        return BankManifest.model_validate(manifest)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise BankCorruptError(f"{manifest_path} is malformed: {problems}") from None


def _check_file(path: Path, name: str, entry: FileEntry | None, verify: bool) -> Path:
    file = path / name
    if not file.is_file():
        raise BankCorruptError(f"memory bank {str(path)!r} is missing {name}")
    if verify and (entry is None or sha256(file) != entry.sha256):
        raise BankCorruptError(f"{file} fails its sha256 checksum; the bank is corrupt")
    return file


def _load_array(path: Path, name: str, entry: FileEntry | None, verify: bool) -> np.ndarray:
    file = _check_file(path, name, entry, verify)
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError) as exc:
        raise BankCorruptError(f"{file} is not a readable .npy array: {exc!r}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BankCorruptError(f"{file} holds NaN or infinite values; the bank is corrupt")
    return array


def read_bank(path: Path, verify: bool = True, attempts: int = 20) -> BankFiles:
    """Read the files of a bank written by `write_bank` (checksums verified unless told not to).

    A writer may swap in a new bank while this reads file by file; then the folder's inode
    changes, and the read (whose files may mix both banks) is retried on the new bank; a reader slowed
    by load can overlap several swaps of a busy writer, hence the generous number of attempts.
    """
    for _ in range(attempts - 1):
        before = _inode(path)
        try:
            files = _read_once(path, verify)
        except BankCorruptError:
            if _inode(path) != before:
                continue
            raise
        if _inode(path) == before:
            return files
    return _read_once(path, verify)


def _inode(path: Path) -> tuple[int, int, int] | None:
    """The folder's identity; with its change time, since a swapped-out folder's inode number can be
    reused by a later save (A -> B -> A' would look unchanged by inode alone)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def _read_once(path: Path, verify: bool) -> BankFiles:
    manifest = read_manifest(path)

    def read(name: str) -> np.ndarray:
        return _load_array(path, name, manifest.files.get(name), verify)

    features, soft = read(FEATURES), read(SOFT_LABELS)
    dtype = manifest.dtype
    if features.dtype != np.dtype(dtype) or soft.dtype != np.dtype(dtype):
        raise BankCorruptError(f"{str(path)!r}: arrays are {features.dtype}/{soft.dtype}, manifest says {dtype!r}")
    if len(features) != manifest.counts.patches:
        raise BankCorruptError(
            f"{str(path)!r}: {len(features)} feature rows, manifest counts {manifest.counts.patches}"
        )
    if (manifest.index.kind != "flat") != (INDEX in manifest.files):
        raise BankCorruptError(
            f"{str(path)!r}: index kind {manifest.index.kind!r} but index file listed: {INDEX in manifest.files}"
        )
    index = _read_index(path, manifest, verify) if INDEX in manifest.files else None
    width = features.shape[1] if features.ndim == 2 else -1
    return BankFiles(
        manifest.contract,
        manifest.settings,
        manifest.counts.images,
        features,
        soft,
        index,
        NoveltyModel.from_entry(manifest.novelty, read, width, str(path / MANIFEST)) if manifest.novelty else None,
        read(IMAGE_IDS) if IMAGE_IDS in manifest.files else None,
    )


def _read_index(path: Path, manifest: BankManifest, verify: bool) -> faiss.Index:
    """The trained faiss index of a bank, configured by its spec and checked against the manifest."""
    index_file = _check_file(path, INDEX, manifest.files.get(INDEX), verify)
    try:
        index = faiss.read_index(str(index_file))
    except (RuntimeError, MemoryError, ValueError, OverflowError) as exc:  # crafted headers: MemoryError
        raise BankCorruptError(f"{path / INDEX} is not a readable faiss index: {exc}") from None
    if index.ntotal != manifest.counts.patches or index.d != manifest.contract.embed_dim:
        raise BankCorruptError(
            f"{path / INDEX} holds {index.ntotal}x{index.d}, the manifest {manifest.counts.patches}x"
            f"{manifest.contract.embed_dim}"
        )
    manifest.index.configure(index)
    return index
