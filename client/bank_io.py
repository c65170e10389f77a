"""On-disk memory-bank format: a folder of .npy arrays + a JSON manifest, no pickle.

Layout (format version `BANK_FORMAT_VERSION`)::

    BANK/manifest.json     format, version, contract, class names, counts, dtype, image size,
                           index spec, and {file: {sha256, bytes}} for every data file
    BANK/features.npy      (N, C) float16|float32, unit-norm rows
    BANK/soft_labels.npy   (N, K) same dtype, rows sum to 1
    BANK/index.faiss       only for trained indexes (IVF/HNSW), via faiss.write_index
    BANK/novelty_*.npy     since version 2, only for banks with a fitted NECO subspace
                           (`novelty.NoveltyModel.save`; its manifest entry is "novelty")

Version 1 banks (no "novelty" entry) load unchanged; NECO then needs a refit.

A flat index is not written: it is a float32 copy of features.npy, rebuilt in one memcpy,
and storing it would triple the bytes of an fp16 bank. The folder is published with
`neco.atomic.staged_directory`, so a crash never leaves a half-written bank under the final
name. Arrays are read with `allow_pickle=False` after their checksums are verified.

This module knows files, not `MemoryBank`: `bank.py` turns a bank into `BankFiles` and back,
so the dependency runs one way (bank -> bank_io).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from neco.atomic import staged_directory
from neco.contract import BANK_FORMAT_VERSION

from .errors import BankCorruptError, BankError, BankVersionError
from .novelty import NoveltyModel

FORMAT_NAME = "neco-memory-bank"
MANIFEST = "manifest.json"
FEATURES = "features.npy"
SOFT_LABELS = "soft_labels.npy"
INDEX = "index.faiss"


@dataclass
class BankFiles:
    """What a bank folder holds: the manifest's own fields plus the decoded data files."""

    manifest: dict[str, Any]
    """Everything in manifest.json except `format`, `format_version` and `files`."""
    features: np.ndarray
    soft_labels: np.ndarray
    index: faiss.Index | None = None
    novelty: NoveltyModel | None = None
    """The fitted NECO subspace (`novelty.py` writes and reads its own .npy files)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bank(path: Path, files: BankFiles) -> Path:
    """Write `files` to folder `path` atomically; an existing bank there is replaced."""
    if path.exists() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise BankError(f"{str(path)!r} exists and is not a memory bank; refusing to overwrite it")
    with staged_directory(path, replace=True) as tmp:
        np.save(tmp / FEATURES, np.ascontiguousarray(files.features), allow_pickle=False)
        np.save(tmp / SOFT_LABELS, np.ascontiguousarray(files.soft_labels), allow_pickle=False)
        names = [FEATURES, SOFT_LABELS]
        if files.index is not None:
            faiss.write_index(files.index, str(tmp / INDEX))
            names.append(INDEX)
        novelty = files.novelty.save(tmp) if files.novelty is not None else None
        if novelty is not None:
            names += list(novelty["files"].values())
        manifest = {
            "format": FORMAT_NAME,
            "format_version": BANK_FORMAT_VERSION,
            **files.manifest,
            "novelty": novelty,
            "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in names},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a bank folder, with its format and version checked."""
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
    if not isinstance(version, int):
        raise BankCorruptError(f"{manifest_path} lacks an integer format_version")
    if version > BANK_FORMAT_VERSION:
        raise BankVersionError(
            f"{str(path)!r} has bank format version {version}; this client reads up to "
            f"{BANK_FORMAT_VERSION}: upgrade neco-dense"
        )
    return manifest


def _check_file(path: Path, name: str, entry: Any, verify: bool) -> Path:
    file = path / name
    if not file.is_file():
        raise BankCorruptError(f"memory bank {str(path)!r} is missing {name}")
    if verify and (not isinstance(entry, dict) or sha256(file) != entry.get("sha256")):
        raise BankCorruptError(f"{file} fails its sha256 checksum; the bank is corrupt")
    return file


def _load_array(path: Path, name: str, entry: Any, verify: bool) -> np.ndarray:
    file = _check_file(path, name, entry, verify)
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BankCorruptError(f"{file} is not a readable .npy array: {exc}") from None


def read_bank(path: Path, verify: bool = True) -> BankFiles:
    """Read the files of a bank written by `write_bank` (checksums verified unless told not to)."""
    manifest = read_manifest(path)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BankCorruptError(f"{path / MANIFEST}: 'files' must be a mapping")
    features = _load_array(path, FEATURES, files.get(FEATURES), verify)
    soft = _load_array(path, SOFT_LABELS, files.get(SOFT_LABELS), verify)
    index = None
    if INDEX in files:
        index_file = _check_file(path, INDEX, files.get(INDEX), verify)
        try:
            index = faiss.read_index(str(index_file))
        except RuntimeError as exc:
            raise BankCorruptError(f"{path / INDEX} is not a readable faiss index: {exc}") from None
    novelty = None
    if manifest.get("novelty") is not None:

        def read(name: str) -> np.ndarray:
            return _load_array(path, name, files.get(name), verify)

        width = features.shape[1] if features.ndim == 2 else -1
        novelty = NoveltyModel.from_manifest(manifest["novelty"], read, width, str(path / MANIFEST))
    fields = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", "novelty")}
    return BankFiles(fields, features, soft, index, novelty)
