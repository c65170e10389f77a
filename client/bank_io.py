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
and storing it would triple the bytes of an fp16 bank. Writes go to a temporary sibling
folder that is renamed into place, so a crash never leaves a half-written bank under the
final name. Arrays are read with `allow_pickle=False` after their checksums are verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from neco.contract import BANK_FORMAT_VERSION, ModelContract

from .bank import IndexSpec, MemoryBank
from .errors import BankContractError, BankCorruptError, BankError, BankVersionError
from .novelty import NoveltyModel

FORMAT_NAME = "neco-memory-bank"
MANIFEST = "manifest.json"
FEATURES = "features.npy"
SOFT_LABELS = "soft_labels.npy"
INDEX = "index.faiss"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_bank(bank: MemoryBank, path: Path) -> Path:
    """Write `bank` to folder `path` atomically; an existing bank there is replaced."""
    if path.exists() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise BankError(f"{str(path)!r} exists and is not a memory bank; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.save(tmp / FEATURES, np.ascontiguousarray(bank.features), allow_pickle=False)
        np.save(tmp / SOFT_LABELS, np.ascontiguousarray(bank.soft_labels), allow_pickle=False)
        files = [FEATURES, SOFT_LABELS]
        if bank.index_spec.kind != "flat":
            faiss.write_index(bank.index, str(tmp / INDEX))
            files.append(INDEX)
        novelty = bank.novelty.save(tmp) if bank.novelty is not None else None
        if novelty is not None:
            files += list(novelty["files"].values())
        manifest = {
            "format": FORMAT_NAME,
            "format_version": BANK_FORMAT_VERSION,
            "contract": bank.contract.model_dump(mode="json"),
            "class_names": bank.class_names,
            "counts": {
                "patches": len(bank),
                "images": bank.num_images,
                "class_mass": [round(float(v), 4) for v in bank.soft_labels.astype(np.float64).sum(axis=0)],
            },
            "dtype": bank.dtype,
            "image_size": bank.image_size,
            "index": bank.index_spec.model_dump(),
            "novelty": novelty,
            "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for name in [*files, MANIFEST]:
            _fsync(tmp / name)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder to `path`; an old bank is moved aside first, then deleted."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _read_manifest(path: Path) -> dict[str, Any]:
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


def load_bank(path: Path, contract: ModelContract | None = None, verify: bool = True) -> MemoryBank:
    """Read a bank written by `save_bank`; see the module docstring for what is checked."""
    manifest = _read_manifest(path)
    try:
        bank_contract = ModelContract.model_validate(manifest["contract"])
        index_spec = IndexSpec.model_validate(manifest.get("index", {}))
        class_names = manifest["class_names"]
        files = manifest["files"]
        dtype = manifest["dtype"]
        image_size = manifest["image_size"]
        num_images = int(manifest["counts"]["images"])
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise BankCorruptError(f"{path / MANIFEST} is malformed: {exc!r}") from None
    if contract is not None and not contract.compatible_with(bank_contract):
        raise BankContractError(
            f"memory bank {str(path)!r} was built with {bank_contract!r}, which differs from the "
            f"model in use {contract!r}; rebuild the bank with this model"
        )
    if not isinstance(files, dict):
        raise BankCorruptError(f"{path / MANIFEST}: 'files' must be a mapping")
    features = _load_array(path, FEATURES, files.get(FEATURES), verify)
    soft = _load_array(path, SOFT_LABELS, files.get(SOFT_LABELS), verify)
    if dtype not in ("float32", "float16") or features.dtype != np.dtype(dtype) or soft.dtype != np.dtype(dtype):
        raise BankCorruptError(f"{str(path)!r}: arrays are {features.dtype}/{soft.dtype}, manifest says {dtype!r}")
    index = None
    if index_spec.kind != "flat":
        index_file = _check_file(path, INDEX, files.get(INDEX), verify)
        try:
            index = faiss.read_index(str(index_file))
        except RuntimeError as exc:
            raise BankCorruptError(f"{path / INDEX} is not a readable faiss index: {exc}") from None
        if index.ntotal != features.shape[0] or index.d != bank_contract.embed_dim:
            raise BankCorruptError(f"{path / INDEX} holds {index.ntotal}x{index.d}, features {features.shape}")
        index_spec.configure(index)
    novelty = None
    if manifest.get("novelty") is not None:

        def read(name: str) -> np.ndarray:
            return _load_array(path, name, files.get(name), verify)

        novelty = NoveltyModel.from_manifest(manifest["novelty"], read, bank_contract.embed_dim, str(path / MANIFEST))
    try:
        return MemoryBank(
            bank_contract,
            features,
            soft,
            class_names,
            image_size=tuple(image_size) if isinstance(image_size, list) else image_size,
            index_spec=index_spec,
            dtype=dtype,
            num_images=num_images,
            index=index,
            novelty=novelty,
        )
    except BankError as exc:
        raise BankCorruptError(f"memory bank {str(path)!r} is inconsistent: {exc}") from None
