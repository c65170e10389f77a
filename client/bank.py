"""The memory bank: L2-normalised support-patch features with soft labels, searchable by faiss.

Building: every support image is resized by the client's one policy (`images.prepare_image`),
its mask is resized the same way (nearest neighbour), each patch gets the class frequencies of
the pixels under it (`support.patch_soft_labels`), and with `memory_size` each image keeps
only a share of its patches, sampled to favour rare classes (`support.sample_rare_first`).

Searching: exact inner product (`faiss.IndexFlatIP`) by default; `IndexSpec(kind="ivf")` or
`"hnsw"` trade exactness for speed on banks of millions of patches. A bank can instead search
through a `VectorStore` such as a Milvus collection (`stores.milvus`), the same API otherwise.
A bank is its contract, its rows (`BankRows`) and its settings (`BankSettings`, the validated
part of manifest.json); persistence lives in `bank_io` (versioned, checksummed, atomic, no pickle).
The bank alone writes its state: appends, deletes and NECO fits are its methods.

Every row remembers its support image (`image_ids`), which makes `delete_images` possible and
lets `merge` rebuild exactly the bank of one process from banks built as shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from neco.client.backend import FeatureBackend
from neco.client.bank_build import BuildOptions, extract, normalise, per_image_budget
from neco.client.bank_io import BankFiles, read_bank, read_manifest, write_bank, writer_lock
from neco.client.bank_manifest import DEFAULT_IMAGE_SIZE, BankSettings, IndexSpec, StorageDtype
from neco.client.errors import (
    BankContractError,
    BankCorruptError,
    BankError,
    NoveltyError,
    NoveltyNotFittedError,
    SupportSetError,
)
from neco.client.images import SizeSpec
from neco.client.novelty import (
    DEFAULT_KNN_K,
    DEFAULT_METHOD,
    METHODS,
    Calibration,
    NoveltyMethod,
    NoveltyModel,
    NoveltySpec,
    knn_novelty,
)
from neco.client.stores import VectorStore
from neco.client.support import open_support, support_size
from neco.contract import IGNORE_INDEX, ModelContract

__all__ = ["DEFAULT_IMAGE_SIZE", "BankRows", "BankSettings", "BuildOptions", "IndexSpec", "MemoryBank", "VectorStore"]


@dataclass(frozen=True)
class BankRows:
    """A bank's rows: unit features, soft labels, the support image of each row, and their keys."""

    features: np.ndarray
    soft_labels: np.ndarray
    image_ids: np.ndarray | None = None
    """(N,) index of each row's support image; None (stored as -1) for banks saved before ids existed."""
    num_images: int = 0
    """Support images the rows came from (an image may contribute no row)."""
    keys: np.ndarray | None = field(default=None, repr=False)
    """(N,) ascending key of each row in a `VectorStore` (rows keep their key across deletes); default 0..N-1."""


class MemoryBank:
    """Support patches (features + soft labels + class names) tied to one model contract."""

    def __init__(
        self,
        contract: ModelContract,
        rows: BankRows,
        settings: BankSettings,
        *,
        novelty: NoveltyModel | None = None,
        index: faiss.Index | None = None,
        store: VectorStore | None = None,
    ) -> None:
        features, soft_labels = np.asarray(rows.features), np.asarray(rows.soft_labels)
        if features.ndim != 2 or features.shape[1] != contract.embed_dim:
            raise BankError(f"features must be (N, {contract.embed_dim}) for {contract.arch}, got {features.shape}")
        count, classes = features.shape[0], len(settings.class_names)
        image_ids = np.full(count, -1, np.int64) if rows.image_ids is None else np.asarray(rows.image_ids)
        if soft_labels.shape != (count, classes):
            raise BankError(f"soft labels must be (N={count}, K={classes}), got {soft_labels.shape}")
        if len(set(settings.class_names)) != classes:
            raise BankError(f"class names must be unique, got {settings.class_names}")
        if image_ids.shape != (count,) or image_ids.dtype.kind not in "iu":
            raise BankError(f"image ids must be ({count},) integers, got {image_ids.shape} {image_ids.dtype}")
        if not (np.isfinite(features).all() and np.isfinite(soft_labels).all()):
            raise BankError("features and soft labels must be finite (NaN/inf found)")
        self.contract = contract
        self.settings = settings
        self.features = features.astype(settings.dtype, copy=False)
        self.soft_labels = soft_labels.astype(settings.dtype, copy=False)
        self.image_ids = image_ids.astype(np.int64, copy=False)
        self.num_images = rows.num_images
        self.row_keys = np.arange(count, dtype=np.int64) if rows.keys is None else np.asarray(rows.keys, np.int64)
        self._novelty = novelty
        self._index = index
        self._store = store
        self._labels32: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        return (
            f"MemoryBank({len(self)} patches x {self.contract.embed_dim} ({self.dtype}), "
            f"{len(self.class_names)} classes, {self.num_images} images, "
            f"index={self.index_spec.kind if self._store is None else type(self._store).__name__})"
        )

    # --- what the settings say ------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self.settings.class_names

    @property
    def image_size(self) -> SizeSpec:
        return self.settings.image_size

    @property
    def dtype(self) -> StorageDtype:
        return self.settings.dtype

    @property
    def index_spec(self) -> IndexSpec:
        return self.settings.index

    @property
    def classes_inferred(self) -> bool:
        """True when no class list was given and K was inferred from the largest mask label."""
        return self.settings.classes_inferred

    @property
    def rows(self) -> BankRows:
        """The bank's rows (the arrays themselves, not copies)."""
        ids = self.image_ids if (self.image_ids >= 0).all() else None
        return BankRows(self.features, self.soft_labels, ids, self.num_images, self.row_keys)

    @property
    def novelty(self) -> NoveltyModel | None:
        """The fitted NECO subspace and its calibrations (`neco.client.novelty`), if any."""
        return self._novelty

    @property
    def store(self) -> VectorStore | None:
        """Searches the bank instead of faiss when set (e.g. a Milvus collection)."""
        return self._store

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (what `save` writes, before the index and manifest)."""
        return int(self.features.nbytes + self.soft_labels.nbytes)

    # --- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls, backend: FeatureBackend, support: Any, options: BuildOptions | None = None, **fields: Any
    ) -> MemoryBank:
        """Extract, label and (optionally) subsample the patches of a support set (`BuildOptions`,
        given as a model or as its fields).

        An empty support set is an error. Without a class list or `num_classes`, K is inferred
        as the largest label + 1: the build warns, and the bank records `classes_inferred`; when most
        of those classes never occur (a stray label 200 would make 201) it refuses instead.
        Join shard banks with `merge`.
        """
        if options is not None and fields:
            raise TypeError("give build options as a BuildOptions or as keywords, not both")
        opts = options or BuildOptions(**fields)
        if opts.image_size is None:  # the support images' own size, as segment() and `neco bank build` use
            opts = opts.model_copy(update={"image_size": support_size(support)})
        opened = open_support(support, opts.class_names, opts.shard)
        if (
            opts.num_classes is not None
            and opened.class_names is not None
            and opts.num_classes != len(opened.class_names)
        ):
            raise SupportSetError(
                f"num_classes={opts.num_classes} but the class list has {len(opened.class_names)} names"
            )
        declared = len(opened.class_names) if opened.class_names is not None else opts.num_classes
        budget = per_image_budget(opened, opts.memory_size, opts.patches_per_image)
        rows = extract(backend, opened, declared, budget, opts)
        if rows.count == 0:
            raise SupportSetError(f"the support set ({opened.source}) is empty")
        width = declared if declared is not None else max(lab.shape[1] for lab in rows.labels)
        soft = np.concatenate([np.pad(lab, ((0, 0), (0, width - lab.shape[1]))) for lab in rows.labels])
        if soft.shape[0] == 0:
            raise SupportSetError(
                f"every support pixel of {opened.source} is ignore ({IGNORE_INDEX}); nothing to store"
            )
        if declared is None:
            seen = int((soft.sum(axis=0) > 0).sum())
            if 2 * seen < width:  # most inferred classes never occur: a stray label, not a class list
                raise SupportSetError(
                    f"no class list for {opened.source}: the largest mask label {width - 1} would make {width} "
                    f"classes, but only {seen} distinct labels occur; pass class_names or num_classes"
                )
            warnings.warn(
                f"no class list for {opened.source}: {width} classes inferred from the largest mask label "
                f"{width - 1} ({seen} distinct labels seen); pass class_names or num_classes to fix K",
                UserWarning,
                stacklevel=2,
            )
        settings = BankSettings(
            class_names=opened.class_names or [f"class_{i}" for i in range(width)],
            image_size=opts.image_size,
            dtype=opts.dtype,
            index=opts.index or IndexSpec(),
            classes_inferred=declared is None,
        )
        features = np.concatenate(rows.features)
        novelty = NoveltyModel.fit(features, opts.novelty) if opts.novelty is not None else None
        bank_rows = BankRows(features, soft, np.concatenate(rows.image_ids), rows.count)
        return cls(backend.contract, bank_rows, settings, novelty=novelty)

    def add(self, backend: FeatureBackend, support: Any, **options: Any) -> MemoryBank:
        """Append a support set's patches (same contract and settings) in place; returns the bank.

        `options` are `BuildOptions` fields other than the settings (memory_size, seed, ...).
        New images get ids after the bank's largest, so `delete_images` can address them.
        The NECO subspace, if any, is refitted on all rows (its calibrations no longer hold).
        """
        if not backend.contract.compatible_with(self.contract):
            raise BankContractError(
                f"cannot add features of another model to this bank ({'; '.join(self.contract.differences(backend.contract))})"
            )
        settings = self.settings.model_dump(include={"class_names", "image_size", "dtype", "index"})
        other = MemoryBank.build(backend, support, BuildOptions(**settings, **options))
        first_id = int(self.image_ids.max(initial=-1)) + 1
        keys = int(self.row_keys.max(initial=-1)) + 1 + np.arange(len(other), dtype=np.int64)
        if self._store is not None:
            self._store.insert(
                int(keys[0]) if len(keys) else 0, other.features, other.soft_labels, other.image_ids + first_id
            )
        self.features = np.concatenate([self.features, other.features])
        self.soft_labels = np.concatenate([self.soft_labels, other.soft_labels])
        self.image_ids = np.concatenate([self.image_ids, other.image_ids + first_id])
        self.row_keys = np.concatenate([self.row_keys, keys])
        self.num_images += other.num_images
        self._labels32 = None
        if self._index is not None and self.index_spec.kind != "flat":
            self._index.add(normalise(other.features))  # trained indexes keep their training
        else:
            self._index = None
        self.refit_novelty()
        return self

    def delete_images(self, image_ids: Sequence[int]) -> int:
        """Remove every row of the given support images (and from the store); returns rows removed.

        The NECO subspace, if any, is refitted on the remaining rows.
        """
        drop = np.isin(self.image_ids, np.asarray(list(image_ids), dtype=np.int64))
        if not drop.any():
            return 0
        if self._store is not None:
            self._store.delete_images(sorted({int(i) for i in image_ids}))
        keep = ~drop
        self.features, self.soft_labels = self.features[keep], self.soft_labels[keep]
        self.image_ids, self.row_keys = self.image_ids[keep], self.row_keys[keep]
        self.num_images = int(np.unique(self.image_ids).size) if (self.image_ids >= 0).all() else self.num_images
        self._labels32, self._index = None, None  # a trained index is retrained on the remaining rows
        self.refit_novelty()
        return int(drop.sum())

    @classmethod
    def merge(cls, banks: Sequence[MemoryBank]) -> MemoryBank:
        """One bank from shard banks of the same model and settings (NECO refitted on the result).

        Rows are ordered by image id (stable), so n shards of one support set merge into the
        bank a single process builds from it. Image ids must be known and disjoint.
        """
        if not banks:
            raise BankError("nothing to merge: give at least one bank")
        first = banks[0]
        for other in banks[1:]:
            if not other.contract.compatible_with(first.contract):
                raise BankContractError(
                    f"cannot merge banks of different models ({'; '.join(first.contract.differences(other.contract))})"
                )
            if other.settings.model_dump(exclude={"classes_inferred"}) != first.settings.model_dump(
                exclude={"classes_inferred"}
            ):
                raise BankError(
                    f"cannot merge banks with different classes/image size/dtype/index: {other!r} vs {first!r}"
                )
        ids = np.concatenate([b.image_ids for b in banks])
        if (ids < 0).any():
            raise BankError("cannot merge banks saved without image ids (rebuild them)")
        per_bank = [set(np.unique(b.image_ids).tolist()) for b in banks]
        if sum(map(len, per_bank)) != len(set().union(*per_bank)):
            raise BankError("the banks share image ids: they are not shards of one support set")
        order = np.argsort(ids, kind="stable")
        features = np.concatenate([b.features for b in banks])[order]
        soft = np.concatenate([b.soft_labels for b in banks])[order]
        settings = first.settings.model_copy(update={"classes_inferred": any(b.classes_inferred for b in banks)})
        novelty = NoveltyModel.fit(features, first.novelty.spec) if first.novelty is not None else None
        rows = BankRows(features, soft, ids[order], sum(b.num_images for b in banks))
        return cls(first.contract, rows, settings, novelty=novelty)

    # --- novelty (the subspace lives with the rows it was fitted on) -----------------------
    def fit_novelty(self, spec: NoveltySpec | None = None) -> NoveltyModel:
        """Fit (or refit) the NECO subspace on the stored patches; returns it (save the bank to keep it)."""
        self._novelty = NoveltyModel.fit(self.features, spec)
        return self._novelty

    def refit_novelty(self) -> None:
        """Refit a fitted subspace with its own spec after the rows changed; stale calibrations are dropped."""
        if self._novelty is not None:
            self._novelty = NoveltyModel.fit(self.features, self._novelty.spec)

    def add_calibrations(self, calibrations: Mapping[str, Calibration]) -> None:
        """Keep decision thresholds (`novelty.calibrate`) with the fitted subspace they were made with."""
        self._novelty = self.require_novelty().with_calibrations(calibrations)

    def require_novelty(self) -> NoveltyModel:
        """The fitted NECO model, or a clear error saying how to get one."""
        if self._novelty is None:
            raise NoveltyNotFittedError(
                "the memory bank has no fitted NECO subspace (banks saved before format version 2 never have "
                "one): call bank.fit_novelty() (or `neco bank novelty BANK`) and save the bank again"
            )
        return self._novelty

    def patch_novelty(
        self, features: np.ndarray, method: NoveltyMethod = DEFAULT_METHOD, k: int = DEFAULT_KNN_K
    ) -> np.ndarray:
        """Novelty of every patch of (..., C) unit-norm query features, shape (...); by default the k-NN
        baseline (`novelty.DEFAULT_METHOD`, best on the benchmark), which needs no fitted subspace."""
        if method == "neco":
            return self.require_novelty().novelty(features)
        if method == "knn":
            flat = np.asarray(features, dtype=np.float32)
            sims, _ = self.search(flat.reshape(-1, flat.shape[-1]), k)
            return knn_novelty(sims).reshape(flat.shape[:-1])
        raise NoveltyError(f"novelty method must be one of {METHODS}, got {method!r}")

    # --- searching ------------------------------------------------------------------------
    @property
    def index(self) -> faiss.Index:
        """The faiss index, built on first use (a flat index is just a float32 copy)."""
        if self._index is None:
            self._index = self.index_spec.create(normalise(self.features))
        return self._index

    @property
    def labels32(self) -> np.ndarray:
        """Soft labels as float32 for label transfer (numpy's float16 arithmetic is emulated
        and slow; the copy is small next to the index's float32 features)."""
        if self._labels32 is None:
            self._labels32 = self.soft_labels.astype(np.float32, copy=False)
        return self._labels32

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), both (Q, min(k, len)), of the nearest bank patches."""
        if len(self) == 0:
            raise BankError("the memory bank is empty")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.contract.embed_dim:
            raise BankError(f"queries must be (Q, {self.contract.embed_dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._store is not None:
            sims, keys = self._store.search(queries, min(k, len(self)))
            rows = np.searchsorted(self.row_keys, keys)  # store keys -> positions (keys stay sorted)
            idx = np.where(keys < 0, -1, np.minimum(rows, len(self) - 1))
        else:
            sims, idx = self.index.search(queries, min(k, len(self)))
        if (idx < 0).any():  # approximate indexes may return fewer than k hits
            sims = np.where(idx < 0, -np.inf, sims)
            idx = np.where(idx < 0, 0, idx)
        return sims, idx

    # --- persistence (files in bank_io) -------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank atomically to folder `path`: absent, empty, or an older bank (replaced).

        Any other folder (files this project did not write, a foreign manifest.json) is refused
        with `BankError` and left untouched; see `bank_io`.
        """
        index = self.index if self.index_spec.kind != "flat" else None
        rows = self.rows
        files = BankFiles(
            self.contract,
            self.settings,
            self.num_images,
            rows.features,
            rows.soft_labels,
            index,
            self._novelty,
            rows.image_ids,
        )
        return write_bank(Path(path), files)

    @classmethod
    def load(cls, path: str | Path, contract: ModelContract | None = None, verify: bool = True) -> MemoryBank:
        """Read a saved bank; with `contract`, refuse one built by a different model."""
        path = Path(path)
        _check_bank_contract(read_manifest(path).contract, path, contract)  # cheap check before reading arrays
        files = read_bank(path, verify)
        _check_bank_contract(files.contract, path, contract)
        rows = BankRows(files.features, files.soft_labels, files.image_ids, files.num_images)
        try:
            return cls(files.contract, rows, files.settings, novelty=files.novelty, index=files.index)
        except BankError as exc:
            raise BankCorruptError(f"memory bank {str(path)!r} is inconsistent: {exc}") from None

    @staticmethod
    @contextmanager
    def updating(path: str | Path, contract: ModelContract | None = None) -> Iterator[MemoryBank]:
        """Load the bank at `path` under its writer lock and save it back when the block succeeds.

        The lock is held across the whole read-modify-write, so concurrent appends to one bank
        (`neco bank append`) wait for each other instead of one silently losing the other's rows.
        """
        with writer_lock(Path(path)):
            bank = MemoryBank.load(path, contract=contract)
            yield bank
            bank.save(path)


def _check_bank_contract(bank_contract: ModelContract, path: Path, contract: ModelContract | None) -> None:
    """With `contract`, refuse a bank of another model (named by its folder: the page shows this to callers)."""
    if contract is not None and not contract.compatible_with(bank_contract):
        raise BankContractError(
            f"memory bank {path.name!r} was built with another model than the one in use "
            f"({'; '.join(bank_contract.differences(contract))}); rebuild the bank with this model"
        )
