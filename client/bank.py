"""The memory bank: L2-normalised support-patch features with soft labels, searchable by faiss.

Building: every support image is resized by the client's one policy (`images.prepare_image`),
its mask is resized the same way (nearest neighbour), each patch gets the class frequencies of
the pixels under it (`support.patch_soft_labels`), and with `memory_size` each image keeps
only a share of its patches, sampled to favour rare classes (`support.sample_rare_first`).

Searching: exact inner product (`faiss.IndexFlatIP`) by default; `IndexSpec(kind="ivf")` or
`"hnsw"` trade exactness for speed on banks of millions of patches. Persistence lives in
`bank_io` (versioned, checksummed, atomic, no pickle).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from neco.contract import DEFAULT_INPUT_SIZE, IGNORE_INDEX, ModelContract

from .backend import FeatureBackend, batch_features
from .bank_io import INDEX, MANIFEST, BankFiles, read_bank, read_manifest, write_bank
from .errors import BankContractError, BankCorruptError, BankError, SupportSetError
from .images import SizeSpec, describe, load_mask, prepare_image, resize_mask
from .novelty import NoveltyModel, NoveltySpec
from .support import SupportSet, iter_pairs, open_support, patch_soft_labels, sample_rare_first

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


def _normalise(features: np.ndarray) -> np.ndarray:
    """Unit-normalise rows in float32; backends promise it, re-doing it makes fp16 storage safe."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


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
    ) -> None:
        features = np.asarray(features)
        soft_labels = np.asarray(soft_labels)
        if features.ndim != 2 or features.shape[1] != contract.embed_dim:
            raise BankError(f"features must be (N, {contract.embed_dim}) for {contract.arch}, got {features.shape}")
        if soft_labels.shape != (features.shape[0], len(class_names)):
            raise BankError(
                f"soft labels must be (N={features.shape[0]}, K={len(class_names)}), got {soft_labels.shape}"
            )
        if len(set(class_names)) != len(class_names):
            raise BankError(f"class names must be unique, got {list(class_names)}")
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

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        return (
            f"MemoryBank({len(self)} patches x {self.contract.embed_dim} ({self.dtype}), "
            f"{len(self.class_names)} classes, {self.num_images} images, index={self.index_spec.kind})"
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
    ) -> MemoryBank:
        """Extract, label and (optionally) subsample the patches of a support set.

        `memory_size` bounds the bank: each of the support set's n images keeps
        memory_size // n patches (rare classes favoured); iterables without a length need
        `patches_per_image` instead. An empty support set is an error. With `novelty`, the
        NECO subspace of the kept patches is fitted too (see `neco.client.novelty`).
        """
        opened = open_support(support, class_names)
        budget = _per_image_budget(opened, memory_size, patches_per_image)
        feats, labels, count = _extract(backend, opened, image_size, budget, batch_size, seed, progress, dtype)
        if count == 0:
            raise SupportSetError(f"the support set ({opened.source}) is empty")
        width = len(opened.class_names) if opened.class_names is not None else max(lab.shape[1] for lab in labels)
        names = opened.class_names or [f"class_{i}" for i in range(width)]
        soft = np.concatenate([np.pad(lab, ((0, 0), (0, width - lab.shape[1]))) for lab in labels])
        if soft.shape[0] == 0:
            raise SupportSetError(
                f"every support pixel of {opened.source} is ignore ({IGNORE_INDEX}); nothing to store"
            )
        features = np.concatenate(feats)
        return cls(
            backend.contract,
            features,
            soft,
            names,
            image_size=image_size,
            index_spec=index,
            dtype=dtype,
            num_images=count,
            novelty=NoveltyModel.fit(features, novelty) if novelty is not None else None,
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
        """Append a support set's patches (same contract and class list) in place."""
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
        self.features = np.concatenate([self.features, other.features])
        self.soft_labels = np.concatenate([self.soft_labels, other.soft_labels])
        self.num_images += other.num_images
        self._labels32 = None
        if self.novelty is not None:  # the subspace follows the bank; old thresholds no longer hold
            self.novelty = self.novelty.refit(self.features)
        if self._index is not None and self.index_spec.kind != "flat":
            self._index.add(_normalise(other.features))  # trained indexes keep their training
        else:
            self._index = None
        return self

    # --- searching ------------------------------------------------------------------------
    @property
    def index(self) -> faiss.Index:
        """The faiss index, built on first use (a flat index is just a float32 copy)."""
        if self._index is None:
            self._index = self.index_spec.create(_normalise(self.features))
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
        sims, idx = self.index.search(queries, min(k, len(self)))
        if (idx < 0).any():  # approximate indexes may return fewer than k hits
            sims = np.where(idx < 0, -np.inf, sims)
            idx = np.where(idx < 0, 0, idx)
        return sims, idx

    # --- persistence (files in bank_io) -------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank atomically to folder `path` (replacing an older bank there)."""
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
        }
        index = self.index if self.index_spec.kind != "flat" else None
        return write_bank(Path(path), BankFiles(manifest, self.features, self.soft_labels, index, self.novelty))

    @classmethod
    def load(cls, path: str | Path, contract: ModelContract | None = None, verify: bool = True) -> MemoryBank:
        """Read a saved bank; with `contract`, refuse one built by a different model."""
        path = Path(path)
        manifest = read_manifest(path)  # cheap checks (format, version, contract) before reading arrays
        try:
            bank_contract = ModelContract.model_validate(manifest["contract"])
            index_spec = IndexSpec.model_validate(manifest.get("index", {}))
            class_names = manifest["class_names"]
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
        files = read_bank(path, verify)
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
            )
        except BankError as exc:
            raise BankCorruptError(f"memory bank {str(path)!r} is inconsistent: {exc}") from None


def _per_image_budget(support: SupportSet, memory_size: int | None, patches_per_image: int | None) -> int | None:
    if memory_size is not None and patches_per_image is not None:
        raise ValueError("give memory_size or patches_per_image, not both")
    if patches_per_image is not None:
        if patches_per_image < 1:
            raise ValueError(f"patches_per_image must be >= 1, got {patches_per_image}")
        return patches_per_image
    if memory_size is None:
        return None
    if memory_size < 1:
        raise ValueError(f"memory_size must be >= 1, got {memory_size}")
    if support.length is None:
        raise ValueError(
            f"memory_size needs a support set of known length; {support.source} has none: use patches_per_image"
        )
    if support.length == 0:
        raise SupportSetError(f"the support set ({support.source}) is empty")
    return max(1, memory_size // support.length)


def _extract(
    backend: FeatureBackend,
    support: SupportSet,
    image_size: SizeSpec,
    budget: int | None,
    batch_size: int,
    seed: int,
    progress: bool,
    dtype: StorageDtype,
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Run the backend over the support set in same-size batches; keep labelled/sampled patches."""
    rng = np.random.default_rng(seed)
    num_classes = len(support.class_names) if support.class_names is not None else None
    patch = backend.contract.patch_size
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (array, soft, chosen rows)

    def flush() -> None:
        if not pending:
            return
        dense = batch_features(backend, [item[0] for item in pending])
        for (_, soft, chosen), grid_feats in zip(pending, dense):
            # cast per image so an fp16 bank never holds all its features in float32 at once
            feats.append(_normalise(grid_feats.reshape(-1, grid_feats.shape[-1])[chosen]).astype(dtype))
            labels.append(soft[chosen])
        pending.clear()

    count = 0
    bar = tqdm(iter_pairs(support), total=support.length, desc="bank", unit="img", disable=not progress)
    for index, image_like, mask_like in bar:
        name = f"support item {index} ({describe(image_like)})"
        prepared = prepare_image(image_like, image_size, patch)
        mask = load_mask(mask_like)
        if mask.shape != prepared.original_size:
            raise SupportSetError(
                f"{name}: mask is {mask.shape[0]}x{mask.shape[1]} but the image is "
                f"{prepared.original_size[0]}x{prepared.original_size[1]}"
            )
        soft, keep = patch_soft_labels(resize_mask(mask, prepared.size), patch, num_classes, name)
        labelled = np.flatnonzero(keep)
        if budget is not None:
            labelled = labelled[sample_rare_first(soft[labelled], budget, rng)]
        if pending and pending[0][0].shape != prepared.array.shape:
            flush()
        pending.append((prepared.array, soft, labelled))
        if len(pending) >= batch_size:
            flush()
        count += 1
    flush()
    return feats, labels, count
