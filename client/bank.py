"""The memory bank: L2-normalised support-patch features with soft labels, searchable by faiss.

Building: every support image is resized by the client's one policy (`images.prepare_image`),
its mask is resized the same way (nearest neighbour), each patch gets the class frequencies of
the pixels under it (`support.patch_soft_labels`), and with `memory_size` each image keeps
only a share of its patches, sampled to favour rare classes (`support.sample_rare_first`).

Searching: exact inner product (`faiss.IndexFlatIP`) by default; `IndexSpec(kind="ivf")` or
`"hnsw"` trade exactness for speed on banks of millions of patches. A bank can instead search
through a `VectorStore` such as a Milvus collection (`milvus_store`), the same API otherwise.
Persistence lives in `bank_io` (versioned, checksummed, atomic, no pickle).

Every row remembers its support image (`image_ids`), which makes `delete_images` possible and
lets `merge` rebuild exactly the bank of one process from banks built as shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from neco.contract import DEFAULT_INPUT_SIZE, IGNORE_INDEX, ModelContract

from .backend import FeatureBackend
from .bank_build import extract, normalise, per_image_budget
from .bank_io import INDEX, MANIFEST, BankFiles, read_bank, read_manifest, write_bank
from .errors import BankContractError, BankCorruptError, BankError, SupportSetError
from .images import SizeSpec
from .novelty import NoveltyModel, NoveltySpec
from .support import open_support

DEFAULT_IMAGE_SIZE = DEFAULT_INPUT_SIZE
"""Shorter side of support and query images, as in the Hummingbird protocol."""

StorageDtype = Literal["float32", "float16"]


class IndexSpec(BaseModel):
    """Which faiss index searches the bank (all use inner product on unit vectors = cosine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = Field(default=1024, ge=1, description="IVF cells")
    nprobe: int = Field(default=32, ge=1, description="IVF cells visited per query")
    hnsw_m: int = Field(default=32, ge=4, description="HNSW graph degree")
    ef_search: int = Field(default=128, ge=1, description="HNSW search breadth")

    def create(self, features: np.ndarray) -> faiss.Index:
        """Build (and for IVF, train) an index over float32 unit vectors."""
        dim = features.shape[1]
        if self.kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(dim)
        elif self.kind == "ivf":
            nlist = min(self.nlist, max(1, features.shape[0] // 39))  # faiss wants >= 39 points per cell
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(features)
        else:
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.configure(index)
        index.add(features)
        return index

    def configure(self, index: faiss.Index) -> None:
        """Apply search-time settings (not stored by faiss.write_index for every index type)."""
        if self.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.nprobe
        elif self.kind == "hnsw":
            index.hnsw.efSearch = self.ef_search


class VectorStore(Protocol):
    """Where a bank's vectors can live instead of a faiss index (e.g. `milvus_store.MilvusStore`).

    Rows are addressed by their position in the bank; the store keeps it as its primary key.
    """

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def insert(self, first_row: int, features: np.ndarray, soft_labels: np.ndarray, image_ids: np.ndarray) -> None: ...

    def delete_images(self, image_ids: Sequence[int]) -> None: ...


class MemoryBank:
    """Support patches (features + soft labels + class names) tied to one model contract."""

    def __init__(
        self,
        contract: ModelContract,
        features: np.ndarray,
        soft_labels: np.ndarray,
        class_names: Sequence[str],
        *,
        image_size: SizeSpec = DEFAULT_IMAGE_SIZE,
        index_spec: IndexSpec | None = None,
        dtype: StorageDtype = "float32",
        num_images: int = 0,
        index: faiss.Index | None = None,
        novelty: NoveltyModel | None = None,
        image_ids: np.ndarray | None = None,
        classes_inferred: bool = False,
        store: VectorStore | None = None,
    ) -> None:
        features = np.asarray(features)
        soft_labels = np.asarray(soft_labels)
        image_ids = np.full(features.shape[0], -1, np.int64) if image_ids is None else np.asarray(image_ids)
        if features.ndim != 2 or features.shape[1] != contract.embed_dim:
            raise BankError(f"features must be (N, {contract.embed_dim}) for {contract.arch}, got {features.shape}")
        if soft_labels.shape != (features.shape[0], len(class_names)):
            raise BankError(
                f"soft labels must be (N={features.shape[0]}, K={len(class_names)}), got {soft_labels.shape}"
            )
        if len(set(class_names)) != len(class_names):
            raise BankError(f"class names must be unique, got {list(class_names)}")
        if image_ids.shape != (features.shape[0],) or image_ids.dtype.kind not in "iu":
            raise BankError(
                f"image ids must be ({features.shape[0]},) integers, got {image_ids.shape} {image_ids.dtype}"
            )
        if not (np.isfinite(features).all() and np.isfinite(soft_labels).all()):
            raise BankError("features and soft labels must be finite (NaN/inf found)")
        self.contract = contract
        self.dtype: StorageDtype = dtype
        self.features = features.astype(dtype, copy=False)
        self.soft_labels = soft_labels.astype(dtype, copy=False)
        self.class_names = list(class_names)
        self.image_size = image_size
        self.index_spec = index_spec or IndexSpec()
        self.num_images = num_images
        self._index = index
        self._labels32: np.ndarray | None = None
        self.novelty = novelty
        """The fitted NECO subspace and its calibrations (`neco.client.novelty`), if any."""
        self.image_ids = image_ids.astype(np.int64, copy=False)
        """(N,) index of each row's support image (-1: unknown, for banks saved before ids existed)."""
        self.classes_inferred = classes_inferred
        """True when no class list was given and K was inferred from the largest mask label."""
        self.store = store
        """Searches the bank instead of faiss when set (e.g. a Milvus collection)."""
        self.row_keys = np.arange(features.shape[0], dtype=np.int64)
        """Ascending key of each row in `store` (rows keep their key across deletes)."""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        return (
            f"MemoryBank({len(self)} patches x {self.contract.embed_dim} ({self.dtype}), "
            f"{len(self.class_names)} classes, {self.num_images} images, "
            f"index={self.index_spec.kind if self.store is None else type(self.store).__name__})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (what `save` writes, before the index and manifest)."""
        return int(self.features.nbytes + self.soft_labels.nbytes)

    # --- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        backend: FeatureBackend,
        support: Any,
        *,
        class_names: Sequence[str] | None = None,
        image_size: SizeSpec = DEFAULT_IMAGE_SIZE,
        memory_size: int | None = None,
        patches_per_image: int | None = None,
        dtype: StorageDtype = "float32",
        index: IndexSpec | None = None,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
        novelty: NoveltySpec | None = None,
        num_classes: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> MemoryBank:
        """Extract, label and (optionally) subsample the patches of a support set.

        `memory_size` bounds the bank: each of the support set's n images keeps
        memory_size // n patches (rare classes favoured); iterables without a length need
        `patches_per_image` instead. An empty support set is an error. With `novelty`, the
        NECO subspace of the kept patches is fitted too (see `neco.client.novelty`).

        Classes: a class list (argument, `classes.json`, or the dataset's `class_names`) or
        `num_classes` fixes K, and mask labels >= K are refused. With neither, K is inferred
        as the largest label + 1 (a stray label 200 makes 201 classes): the build warns, and
        the bank records `classes_inferred`. `shard=(i, n)` builds the i-th interleaved shard
        (see `support`; join shards with `merge`).
        """
        opened = open_support(support, class_names, shard)
        if num_classes is not None and opened.class_names is not None and num_classes != len(opened.class_names):
            raise SupportSetError(f"num_classes={num_classes} but the class list has {len(opened.class_names)} names")
        declared = len(opened.class_names) if opened.class_names is not None else num_classes
        budget = per_image_budget(opened, memory_size, patches_per_image)
        rows = extract(backend, opened, declared, image_size, budget, batch_size, seed, progress, dtype)
        if rows.count == 0:
            raise SupportSetError(f"the support set ({opened.source}) is empty")
        width = declared if declared is not None else max(lab.shape[1] for lab in rows.labels)
        names = opened.class_names or [f"class_{i}" for i in range(width)]
        soft = np.concatenate([np.pad(lab, ((0, 0), (0, width - lab.shape[1]))) for lab in rows.labels])
        if soft.shape[0] == 0:
            raise SupportSetError(
                f"every support pixel of {opened.source} is ignore ({IGNORE_INDEX}); nothing to store"
            )
        if declared is None:
            seen = int((soft.sum(axis=0) > 0).sum())
            warnings.warn(
                f"no class list for {opened.source}: {width} classes inferred from the largest mask label "
                f"{width - 1} ({seen} distinct labels seen); pass class_names or num_classes to fix K",
                UserWarning,
                stacklevel=2,
            )
        features = np.concatenate(rows.features)
        return cls(
            backend.contract,
            features,
            soft,
            names,
            image_size=image_size,
            index_spec=index,
            dtype=dtype,
            num_images=rows.count,
            novelty=NoveltyModel.fit(features, novelty) if novelty is not None else None,
            image_ids=np.concatenate(rows.image_ids),
            classes_inferred=declared is None,
        )

    def add(
        self,
        backend: FeatureBackend,
        support: Any,
        *,
        memory_size: int | None = None,
        patches_per_image: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> MemoryBank:
        """Append a support set's patches (same contract and class list) in place.

        Its images get ids after the bank's largest, so `delete_images` can address them.
        """
        if not backend.contract.compatible_with(self.contract):
            raise BankError(f"cannot add features of {backend.contract} to a bank of {self.contract}")
        other = MemoryBank.build(
            backend,
            support,
            class_names=self.class_names,
            image_size=self.image_size,
            memory_size=memory_size,
            patches_per_image=patches_per_image,
            dtype=self.dtype,
            index=self.index_spec,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        first_id = int(self.image_ids.max(initial=-1)) + 1
        self._append(other.features, other.soft_labels, other.image_ids + first_id)
        self.num_images += other.num_images
        return self

    def _append(self, features: np.ndarray, soft_labels: np.ndarray, image_ids: np.ndarray) -> None:
        keys = int(self.row_keys[-1]) + 1 + np.arange(len(features)) if len(self) else np.arange(len(features))
        if self.store is not None:
            self.store.insert(int(keys[0]) if len(keys) else 0, features, soft_labels, image_ids)
        self.features = np.concatenate([self.features, features.astype(self.dtype, copy=False)])
        self.soft_labels = np.concatenate([self.soft_labels, soft_labels.astype(self.dtype, copy=False)])
        self.image_ids = np.concatenate([self.image_ids, image_ids.astype(np.int64)])
        self.row_keys = np.concatenate([self.row_keys, keys.astype(np.int64)])
        self._labels32 = None
        if self.novelty is not None:  # the subspace follows the bank; old thresholds no longer hold
            self.novelty = self.novelty.refit(self.features)
        if self._index is not None and self.index_spec.kind != "flat":
            self._index.add(normalise(features))  # trained indexes keep their training
        else:
            self._index = None

    def delete_images(self, image_ids: Sequence[int]) -> int:
        """Remove every row of the given support images (and from the store); returns rows removed."""
        drop = np.isin(self.image_ids, np.asarray(list(image_ids), dtype=np.int64))
        if not drop.any():
            return 0
        if self.store is not None:
            self.store.delete_images(sorted({int(i) for i in image_ids}))
        keep = ~drop
        self.features, self.soft_labels = self.features[keep], self.soft_labels[keep]
        self.image_ids, self.row_keys = self.image_ids[keep], self.row_keys[keep]
        self.num_images = int(np.unique(self.image_ids).size) if (self.image_ids >= 0).all() else self.num_images
        self._labels32, self._index = None, None  # a trained index is retrained on the remaining rows
        if self.novelty is not None:
            self.novelty = self.novelty.refit(self.features)
        return int(drop.sum())

    @classmethod
    def merge(cls, banks: Sequence[MemoryBank]) -> MemoryBank:
        """One bank from shard banks of the same model, classes, image size, dtype and index.

        Rows are ordered by image id (stable), so n shards of one support set merge into the
        bank a single process builds from it. Image ids must be known and disjoint.
        """
        if not banks:
            raise BankError("nothing to merge: give at least one bank")
        first = banks[0]
        for other in banks[1:]:
            same = (other.class_names, other.image_size, other.dtype, other.index_spec)
            if not other.contract.compatible_with(first.contract):
                raise BankContractError(f"cannot merge a bank of {other.contract!r} into one of {first.contract!r}")
            if same != (first.class_names, first.image_size, first.dtype, first.index_spec):
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
        return cls(
            first.contract,
            features,
            np.concatenate([b.soft_labels for b in banks])[order],
            first.class_names,
            image_size=first.image_size,
            index_spec=first.index_spec,
            dtype=first.dtype,
            num_images=sum(b.num_images for b in banks),
            image_ids=ids[order],
            classes_inferred=any(b.classes_inferred for b in banks),
            novelty=NoveltyModel.fit(features, first.novelty.spec) if first.novelty is not None else None,
        )

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
        if self.store is not None:
            sims, keys = self.store.search(queries, min(k, len(self)))
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
        manifest = {
            "contract": self.contract.model_dump(mode="json"),
            "class_names": self.class_names,
            "counts": {
                "patches": len(self),
                "images": self.num_images,
                "class_mass": [round(float(v), 4) for v in self.soft_labels.astype(np.float64).sum(axis=0)],
            },
            "dtype": self.dtype,
            "image_size": self.image_size,
            "index": self.index_spec.model_dump(),
            "classes_inferred": self.classes_inferred,
        }
        ids = self.image_ids if (self.image_ids >= 0).all() else None
        index = self.index if self.index_spec.kind != "flat" else None
        return write_bank(Path(path), BankFiles(manifest, self.features, self.soft_labels, index, self.novelty, ids))

    @classmethod
    def load(cls, path: str | Path, contract: ModelContract | None = None, verify: bool = True) -> MemoryBank:
        """Read a saved bank; with `contract`, refuse one built by a different model."""
        path = Path(path)
        _check_bank_contract(read_manifest(path), path, contract)  # cheap checks before reading arrays
        files = read_bank(path, verify)
        manifest = {**files.manifest, "contract": _check_bank_contract(files.manifest, path, contract).model_dump()}
        try:
            bank_contract = ModelContract.model_validate(manifest["contract"])
            index_spec = IndexSpec.model_validate(manifest.get("index", {}))
            class_names = manifest["class_names"]
            dtype = manifest["dtype"]
            image_size = manifest["image_size"]
            num_images = int(manifest["counts"]["images"])
            classes_inferred = bool(manifest.get("classes_inferred", False))
        except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise BankCorruptError(f"{path / MANIFEST} is malformed: {exc!r}") from None
        features, soft = files.features, files.soft_labels
        if dtype not in ("float32", "float16") or features.dtype != np.dtype(dtype) or soft.dtype != np.dtype(dtype):
            raise BankCorruptError(f"{str(path)!r}: arrays are {features.dtype}/{soft.dtype}, manifest says {dtype!r}")
        if (index_spec.kind != "flat") != (files.index is not None):
            raise BankCorruptError(
                f"{str(path)!r}: index kind {index_spec.kind!r} but index file present: {files.index is not None}"
            )
        if files.index is not None:
            if files.index.ntotal != features.shape[0] or files.index.d != bank_contract.embed_dim:
                raise BankCorruptError(
                    f"{path / INDEX} holds {files.index.ntotal}x{files.index.d}, features {features.shape}"
                )
            index_spec.configure(files.index)
        try:
            return cls(
                bank_contract,
                features,
                soft,
                class_names,
                image_size=tuple(image_size) if isinstance(image_size, list) else image_size,
                index_spec=index_spec,
                dtype=dtype,
                num_images=num_images,
                index=files.index,
                novelty=files.novelty,
                image_ids=files.image_ids,
                classes_inferred=classes_inferred,
            )
        except BankError as exc:
            raise BankCorruptError(f"memory bank {str(path)!r} is inconsistent: {exc}") from None


def _check_bank_contract(manifest: dict[str, Any], path: Path, contract: ModelContract | None) -> ModelContract:
    """The bank's contract from its manifest; with `contract`, refuse a bank of another model."""
    try:
        bank_contract = ModelContract.model_validate(manifest["contract"])
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise BankCorruptError(f"{path / MANIFEST} is malformed: {exc!r}") from None
    if contract is not None and not contract.compatible_with(bank_contract):
        raise BankContractError(
            f"memory bank {str(path)!r} was built with {bank_contract!r}, which differs from the "
            f"model in use {contract!r}; rebuild the bank with this model"
        )
    return bank_contract
