"""Memory banks in Milvus: the bank's rows in one collection, searched by the Milvus engine.

A bank of billions of patches does not fit one faiss index in one process; Milvus shards it
over a cluster. The same code runs against an embedded **Milvus Lite** file (a path ending in
``.db``, no server; the local default and what the tests use) and a cluster URI
(``http://host:19530``). Install the ``milvus`` extra (README.md, Install); pymilvus is imported
only when a store is opened, so the `client` extra never needs it.

One collection holds one bank:

    key       INT64 primary key = the bank's row key (`BankRows.keys`)
    image_id  INT64 support image of the row (delete by image)
    vector    FLOAT_VECTOR (or FLOAT16_VECTOR where the server has it) of `embed_dim`, unit norm
    soft      ARRAY<FLOAT> of the K class frequencies of the patch

and a collection property ``neco.manifest`` (JSON: format, contract, class names, image size,
dtypes), so opening a collection written for another model is refused with `BankContractError`
before any row is read. The vector index is FLAT with inner product: exact, so search through
Milvus equals search through faiss (`IndexFlatIP`) on the same rows.

Milvus Lite (3.x) refuses FLOAT16_VECTOR; asking for it there raises `BankStoreError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from neco.client.backend import FeatureBackend
from neco.client.bank import BankRows, BankSettings, MemoryBank
from neco.client.bank_build import normalise
from neco.client.bank_manifest import DEFAULT_IMAGE_SIZE, Count, ImageSize, StorageDtype
from neco.client.errors import (
    BankContractError,
    BankCorruptError,
    BankError,
    BankStoreError,
    BankStoreUnavailableError,
)
from neco.contract import ModelContract
from neco.errors import MissingExtraError

DEFAULT_URI = "neco_bank.db"
"""Milvus Lite file used when no URI is given (relative to the working directory)."""
DEFAULT_COLLECTION = "neco_bank"
MANIFEST_PROPERTY = "neco.manifest"
FORMAT_NAME = "neco-milvus-bank"
FORMAT_VERSION = 1
MAX_CLASSES = 4096
"""Milvus caps ARRAY fields at 4096 elements, so a bank holds at most that many classes."""
BATCH_BYTES = 16 << 20
"""Insert in batches of about this many bytes: large enough to amortise a call, well under gRPC's limit."""
SEARCH_BATCH = 1024
"""Queries per search call (Milvus caps nq at 16384)."""

VectorDtype = Literal["float32", "float16"]
_NUMPY = {"float32": np.float32, "float16": np.float16}


class MilvusBankOptions(BaseModel):
    """What `open_bank` needs besides the rows to restore the same `MemoryBank`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    image_size: ImageSize = DEFAULT_IMAGE_SIZE
    dtype: StorageDtype = "float32"
    num_images: Count = 0
    classes_inferred: StrictBool = False


class MilvusManifest(BaseModel):
    """The collection property `MANIFEST_PROPERTY`: the model, classes and options of the bank it holds."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal["neco-milvus-bank"] = FORMAT_NAME
    version: Annotated[int, Field(strict=True, ge=1, le=FORMAT_VERSION)] = FORMAT_VERSION
    contract: ModelContract
    class_names: list[StrictStr] = Field(max_length=MAX_CLASSES)
    vector_dtype: VectorDtype = "float32"
    bank: MilvusBankOptions = MilvusBankOptions()


def _pymilvus() -> Any:
    """pymilvus, imported on first use with a message naming the extra when it is missing."""
    try:
        import pymilvus
    except ImportError as exc:
        raise MissingExtraError("Milvus bank stores", "pymilvus", "milvus") from exc
    return pymilvus


def check_uri(uri: str) -> str:
    """A Milvus Lite file (``*.db``) or a server URI (``http(s)://host:port``); anything else is refused."""
    if uri.endswith(".db") or uri.startswith(("http://", "https://")):
        return uri
    raise BankError(f"Milvus URI {uri!r} is neither a Milvus Lite file (*.db) nor http(s)://host:port")


@contextmanager
def _milvus_errors(uri: str, what: str) -> Iterator[None]:
    """Turn pymilvus failures into the bank's typed errors, naming the URI and the operation."""
    pymilvus = _pymilvus()
    try:
        yield
    except pymilvus.exceptions.MilvusException as exc:
        detail = getattr(exc, "message", "") or repr(exc)
        raise BankStoreError(f"Milvus at {uri!r} refused to {what}: {detail}") from None


class MilvusStore:
    """One bank's rows in one Milvus collection; the `bank.VectorStore` a `MemoryBank` searches through.

    Use `create` for a new collection and `open` for an existing one (which checks its manifest).
    """

    def __init__(self, client: Any, uri: str, collection: str, manifest: MilvusManifest) -> None:
        self.client = client
        self.uri = uri
        self.collection = collection
        self.manifest = manifest
        self.contract = manifest.contract
        self.vector_dtype: VectorDtype = manifest.vector_dtype
        self.num_classes = len(manifest.class_names)

    def __repr__(self) -> str:
        return f"MilvusStore({self.uri!r}, {self.collection!r}, {self.contract.arch}, {self.vector_dtype})"

    # --- connecting -----------------------------------------------------------------------
    @staticmethod
    def connect(uri: str = DEFAULT_URI, timeout: float = 10.0) -> Any:
        """A `pymilvus.MilvusClient`; an unreachable server is `BankStoreUnavailableError`."""
        pymilvus = _pymilvus()
        try:
            return pymilvus.MilvusClient(check_uri(uri), timeout=timeout)
        except pymilvus.exceptions.MilvusException as exc:
            detail = getattr(exc, "message", "") or type(exc).__name__
            raise BankStoreUnavailableError(f"Milvus at {uri!r} is not reachable: {detail}") from None

    @classmethod
    def create(
        cls,
        contract: ModelContract,
        class_names: Sequence[str],
        *,
        uri: str = DEFAULT_URI,
        collection: str = DEFAULT_COLLECTION,
        bank_options: MilvusBankOptions | None = None,
        vector_dtype: VectorDtype = "float32",
        overwrite: bool = False,
        timeout: float = 10.0,
    ) -> MilvusStore:
        """A new, empty collection for banks of `contract` with these classes.

        An existing collection is refused unless `overwrite` (then it is dropped first, but only
        when it is a bank of this project). `bank_options` (image size, dtype, ...) go into the
        manifest so `open_bank` restores the same `MemoryBank`.
        """
        if len(class_names) > MAX_CLASSES:
            raise BankError(f"a Milvus bank holds at most {MAX_CLASSES} classes, got {len(class_names)}")
        if vector_dtype not in _NUMPY:
            raise BankError(f"vector_dtype must be 'float32' or 'float16', got {vector_dtype!r}")
        manifest = MilvusManifest(
            contract=contract,
            class_names=list(class_names),
            vector_dtype=vector_dtype,
            bank=bank_options or MilvusBankOptions(),
        )
        client = cls.connect(uri, timeout)
        if client.has_collection(collection):
            if not overwrite:
                raise BankStoreError(f"collection {collection!r} already exists at {uri!r}; pass overwrite=True")
            cls._read_manifest(client, uri, collection)  # never drop a collection this project did not write
            client.drop_collection(collection)
        pymilvus = _pymilvus()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("image_id", pymilvus.DataType.INT64)
        vector_type = pymilvus.DataType.FLOAT_VECTOR if vector_dtype == "float32" else pymilvus.DataType.FLOAT16_VECTOR
        schema.add_field("vector", vector_type, dim=contract.embed_dim)
        schema.add_field(
            "soft", pymilvus.DataType.ARRAY, element_type=pymilvus.DataType.FLOAT, max_capacity=max(1, len(class_names))
        )
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        try:
            client.create_collection(
                collection,
                schema=schema,
                index_params=index,
                consistency_level="Strong",  # a search sees every insert and delete before it
                properties={MANIFEST_PROPERTY: manifest.model_dump_json()},
            )
        except pymilvus.exceptions.MilvusException as exc:
            detail = getattr(exc, "message", "") or repr(exc)
            hint = (
                " (Milvus Lite has no FLOAT16 vectors: use vector_dtype='float32')" if vector_dtype == "float16" else ""
            )
            raise BankStoreError(f"Milvus at {uri!r} refused collection {collection!r}{hint}: {detail}") from None
        return cls(client, uri, collection, manifest)

    @classmethod
    def open(
        cls,
        uri: str = DEFAULT_URI,
        collection: str = DEFAULT_COLLECTION,
        contract: ModelContract | None = None,
        timeout: float = 10.0,
    ) -> MilvusStore:
        """An existing bank collection; with `contract`, refuse one written for another model."""
        client = cls.connect(uri, timeout)
        if not client.has_collection(collection):
            raise BankError(f"no collection {collection!r} at {uri!r}")
        manifest = cls._read_manifest(client, uri, collection)
        store = cls(client, uri, collection, manifest)
        if contract is not None and not contract.compatible_with(store.contract):
            raise BankContractError(
                f"Milvus collection {collection!r} at {uri!r} holds a bank of {store.contract!r}, which differs "
                f"from the model in use {contract!r}; rebuild the bank with this model"
            )
        with _milvus_errors(uri, f"load collection {collection!r}"):
            client.load_collection(collection)
        return store

    @staticmethod
    def _read_manifest(client: Any, uri: str, collection: str) -> MilvusManifest:
        """The collection's manifest, validated and checked against its schema (dimension, class count)."""
        with _milvus_errors(uri, f"describe collection {collection!r}"):
            described = client.describe_collection(collection)
        where = f"Milvus collection {collection!r} at {uri!r}"
        text = (described.get("properties") or {}).get(MANIFEST_PROPERTY)
        if text is None:
            raise BankStoreError(f"{where} is not a memory bank of this project (no {MANIFEST_PROPERTY!r} property)")
        try:
            manifest = MilvusManifest.model_validate_json(text)
        except ValidationError as exc:
            raise BankCorruptError(f"{where}: malformed manifest: {exc}") from None
        contract, classes = manifest.contract, len(manifest.class_names)
        fields = {field["name"]: field for field in described.get("fields", [])}
        if set(fields) != {"key", "image_id", "vector", "soft"}:
            raise BankCorruptError(f"{where}: fields {sorted(fields)}, expected key, image_id, vector, soft")
        dim = int(fields["vector"]["params"].get("dim", -1))
        capacity = int(fields["soft"]["params"].get("max_capacity", -1))
        if dim != contract.embed_dim or capacity != max(1, classes):
            raise BankCorruptError(
                f"{where}: vectors of dimension {dim} and {capacity} label slots, but its manifest's "
                f"{contract.arch} has {contract.embed_dim} dimensions and {classes} classes"
            )
        return manifest

    # --- the VectorStore protocol ---------------------------------------------------------
    def insert(self, first_row: int, features: np.ndarray, soft_labels: np.ndarray, image_ids: np.ndarray) -> None:
        """Add rows with keys first_row, first_row + 1, ... (unit-normalised as faiss would be)."""
        features, soft_labels = np.asarray(features), np.asarray(soft_labels, dtype=np.float32)
        image_ids = np.asarray(image_ids, dtype=np.int64)
        if features.ndim != 2 or features.shape[1] != self.contract.embed_dim:
            raise BankError(
                f"features must be (N, {self.contract.embed_dim}) for {self.contract.arch}, got {features.shape}"
            )
        if soft_labels.shape != (len(features), self.num_classes) or image_ids.shape != (len(features),):
            raise BankError(
                f"soft labels must be (N={len(features)}, K={self.num_classes}) and image ids (N,), "
                f"got {soft_labels.shape} and {image_ids.shape}"
            )
        vectors = normalise(features).astype(_NUMPY[self.vector_dtype], copy=False)
        row_bytes = vectors.itemsize * vectors.shape[1] + 4 * self.num_classes + 16
        step = max(1, BATCH_BYTES // row_bytes)
        with _milvus_errors(self.uri, f"insert into {self.collection!r}"):
            for start in range(0, len(vectors), step):
                stop = min(start + step, len(vectors))
                rows = [
                    {
                        "key": first_row + i,
                        "image_id": int(image_ids[i]),
                        "vector": vectors[i],
                        "soft": soft_labels[i].tolist(),
                    }
                    for i in range(start, stop)
                ]
                self.client.insert(self.collection, rows)
            # Seal the rows into indexed segments: Milvus Lite otherwise rescans its unindexed
            # in-memory table in Python on every search (seconds per call at a few thousand rows).
            self.client.flush(self.collection)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, keys), both (Q, k), by exact inner product; missing hits are key -1, similarity -inf."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.contract.embed_dim:
            raise BankError(f"queries must be (Q, {self.contract.embed_dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        keys = np.full((len(queries), k), -1, dtype=np.int64)
        data = queries.astype(_NUMPY[self.vector_dtype], copy=False)
        with _milvus_errors(self.uri, f"search {self.collection!r}"):
            for start in range(0, len(data), SEARCH_BATCH):
                batch = data[start : start + SEARCH_BATCH]
                found = self.client.search(
                    self.collection,
                    data=list(batch),
                    limit=k,
                    anns_field="vector",
                    search_params={"metric_type": "IP"},
                    output_fields=["key"],  # [] returns every field, vectors included
                )
                for row, hits in enumerate(found, start=start):
                    keys[row, : len(hits.ids)] = hits.ids
                    sims[row, : len(hits.distances)] = hits.distances
        return sims, keys

    def delete_images(self, image_ids: Sequence[int]) -> None:
        """Remove every row of these support images."""
        ids = sorted({int(i) for i in image_ids})
        with _milvus_errors(self.uri, f"delete from {self.collection!r}"):
            for start in range(0, len(ids), 1000):  # keeps each filter expression short
                self.client.delete(self.collection, filter=f"image_id in {ids[start : start + 1000]}")

    # --- reading back ---------------------------------------------------------------------
    def count(self) -> int:
        """Rows in the collection."""
        with _milvus_errors(self.uri, f"count {self.collection!r}"):
            found = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(found[0]["count(*)"])

    def rows(self, batch_size: int = 10_000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(keys, features float32, soft labels float32, image ids) of every row, in ascending key order."""
        keys, vectors, soft, images = [], [], [], []
        with _milvus_errors(self.uri, f"read {self.collection!r}"):
            iterator = self.client.query_iterator(
                self.collection, batch_size=batch_size, filter="", output_fields=["key", "image_id", "vector", "soft"]
            )
            try:
                while batch := iterator.next():
                    keys += [r["key"] for r in batch]
                    images += [r["image_id"] for r in batch]
                    vectors += [np.asarray(r["vector"], dtype=np.float32).reshape(-1) for r in batch]
                    soft += [np.asarray(r["soft"], dtype=np.float32) for r in batch]
            finally:
                iterator.close()
        order = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
        dim, classes = self.contract.embed_dim, self.num_classes
        return (
            np.asarray(keys, dtype=np.int64)[order],
            np.asarray(vectors, dtype=np.float32).reshape(-1, dim)[order],
            np.asarray(soft, dtype=np.float32).reshape(-1, classes)[order],
            np.asarray(images, dtype=np.int64)[order],
        )

    def drop(self) -> None:
        """Delete the collection (the bank's rows and manifest)."""
        with _milvus_errors(self.uri, f"drop {self.collection!r}"):
            self.client.drop_collection(self.collection)

    def close(self) -> None:
        self.client.close()


def build_bank(
    source: MemoryBank | Any,
    *,
    backend: FeatureBackend | None = None,
    uri: str = DEFAULT_URI,
    collection: str = DEFAULT_COLLECTION,
    vector_dtype: VectorDtype = "float32",
    overwrite: bool = False,
    timeout: float = 10.0,
    **build_options: Any,
) -> MemoryBank:
    """Write a bank (or the bank `MemoryBank.build(backend, source, **build_options)` makes) into a
    new collection; returns the bank, now searching through Milvus (appends and deletes follow)."""
    if isinstance(source, MemoryBank):
        bank = source
    elif backend is None:
        raise BankError("building a Milvus bank from a support set needs a backend")
    else:
        bank = MemoryBank.build(backend, source, **build_options)
    options = MilvusBankOptions(
        image_size=bank.image_size,
        dtype=bank.dtype,
        num_images=bank.num_images,
        classes_inferred=bank.classes_inferred,
    )
    store = MilvusStore.create(
        bank.contract,
        bank.class_names,
        uri=uri,
        collection=collection,
        bank_options=options,
        vector_dtype=vector_dtype,
        overwrite=overwrite,
        timeout=timeout,
    )
    if len(bank):
        store.insert(0, bank.features, bank.soft_labels, bank.image_ids)
    rows = BankRows(bank.features, bank.soft_labels, bank.image_ids, bank.num_images)  # keys 0..N-1, as inserted
    return MemoryBank(bank.contract, rows, bank.settings, novelty=bank.novelty, store=store)


def open_bank(
    uri: str = DEFAULT_URI,
    collection: str = DEFAULT_COLLECTION,
    contract: ModelContract | None = None,
    timeout: float = 10.0,
) -> MemoryBank:
    """The bank held by a collection (rows read back), searching through it; with `contract`,
    a collection of another model is `BankContractError`."""
    store = MilvusStore.open(uri, collection, contract, timeout)
    keys, features, soft, image_ids = store.rows()
    options = store.manifest.bank
    settings = BankSettings(
        class_names=store.manifest.class_names,
        image_size=options.image_size,
        dtype=options.dtype,
        classes_inferred=options.classes_inferred,
    )
    num_images = int(np.unique(image_ids).size) if (image_ids >= 0).all() else options.num_images
    rows = BankRows(features.astype(settings.dtype, copy=False), soft, image_ids, num_images, keys)
    return MemoryBank(store.contract, rows, settings, store=store)
