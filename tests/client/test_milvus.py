"""Memory banks in Milvus Lite: parity with faiss, append/delete round trips, typed errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neco.client import BankError, MemoryBank, segment
from neco.client.bank import BankRows, BankSettings
from neco.client.errors import BankContractError, BankCorruptError, BankStoreError, BankStoreUnavailableError
from neco.client.stores.milvus import MANIFEST_PROPERTY, MilvusStore, build_bank, open_bank
from neco.contract import DEFAULT_K, ModelContract

from .conftest import ColourBackend

CLASSES = ["background", "disc", "box", "triangle"]
SIZE = 112
"""Bank and query side: 8x8 patches per image keep Milvus Lite (about 25 ms a query here) fast."""


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return str(tmp_path / "banks.db")


def _bank(backend: ColourBackend, scenes: list) -> MemoryBank:
    return MemoryBank.build(backend, scenes, class_names=CLASSES, image_size=SIZE)


def _assert_same_top_k(found: tuple, reference: tuple, queries: np.ndarray, features: np.ndarray) -> None:
    """Same similarities and neighbours per query, up to ties: a neighbour only one side found must
    score (exactly, in float64) within 1e-5 of that query's k-th similarity."""
    (sims, idx), (ref_sims, ref_idx) = found, reference
    assert sims.shape == ref_sims.shape == idx.shape == ref_idx.shape
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    exact = queries.astype(np.float64) @ (features / np.linalg.norm(features, axis=1, keepdims=True)).T.astype(
        np.float64
    )
    kth = np.sort(exact, axis=1)[:, -idx.shape[1]]
    for row, (a, b) in enumerate(zip(idx, ref_idx)):
        differing = np.array(sorted(set(a) ^ set(b)), dtype=np.int64)
        assert (np.abs(exact[row, differing] - kth[row]) < 1e-5).all(), (row, differing)
    assert np.mean([set(a) == set(b) for a, b in zip(idx, ref_idx)]) > 0.9  # ties are rare


def test_segment_through_milvus_lite_equals_segment_through_faiss(colour_backend, scenes_224, uri) -> None:
    faiss_bank = _bank(colour_backend, scenes_224[:3])
    milvus_bank = build_bank(_bank(colour_backend, scenes_224[:3]), uri=uri, collection="parity")
    assert isinstance(milvus_bank.store, MilvusStore) and milvus_bank.store.count() == len(faiss_bank)
    query = colour_backend.features([scenes_224[3][0]])[0].reshape(-1, 384)[::4]
    _assert_same_top_k(
        milvus_bank.search(query, DEFAULT_K), faiss_bank.search(query, DEFAULT_K), query, faiss_bank.features
    )
    expected = segment(colour_backend, scenes_224[3][0], faiss_bank)
    result = segment(colour_backend, scenes_224[3][0], milvus_bank)
    np.testing.assert_array_equal(result.mask, expected.mask)
    np.testing.assert_allclose(result.confidence, expected.confidence, atol=1e-5)


def test_append_and_delete_by_image_round_trip(colour_backend, scenes_224, uri) -> None:
    bank = build_bank(_bank(colour_backend, scenes_224[:2]), uri=uri)
    bank.add(colour_backend, scenes_224[2:])
    assert bank.delete_images([0, 2]) == 128
    # Independent expectation: the two builds' rows, image ids offset by 2, images 0 and 2 dropped.
    first, second = _bank(colour_backend, scenes_224[:2]), _bank(colour_backend, scenes_224[2:])
    features = np.concatenate([first.features, second.features])
    soft = np.concatenate([first.soft_labels, second.soft_labels])
    ids = np.concatenate([first.image_ids, second.image_ids + 2])
    keep = ~np.isin(ids, [0, 2])
    features, soft, ids, keys = features[keep], soft[keep], ids[keep], np.arange(len(keep))[keep]

    stored_keys, stored_features, stored_soft, stored_ids = bank.store.rows()
    np.testing.assert_array_equal(stored_keys, keys)
    np.testing.assert_array_equal(stored_ids, ids)
    np.testing.assert_allclose(stored_soft, soft, atol=1e-7)
    np.testing.assert_allclose(stored_features, features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-6)

    queries = colour_backend.features([scenes_224[0][0]])[0].reshape(-1, 384)[::8]
    sims, found = bank.store.search(queries, DEFAULT_K)
    exact = queries @ features.T
    np.testing.assert_allclose(sims, -np.sort(-exact, axis=1)[:, :DEFAULT_K], atol=1e-5)
    rows = np.searchsorted(keys, found)
    assert np.isin(found, keys).all()
    np.testing.assert_allclose(np.take_along_axis(exact, rows, axis=1), sims, atol=1e-5)  # each key has its score

    reopened = open_bank(uri, contract=colour_backend.contract)
    assert len(reopened) == len(bank) == keep.sum() and reopened.num_images == 2
    np.testing.assert_array_equal(reopened.row_keys, keys)
    assert reopened.class_names == CLASSES and reopened.image_size == SIZE
    query = scenes_224[1][0]
    np.testing.assert_array_equal(
        segment(colour_backend, query, reopened).mask,
        segment(
            colour_backend,
            query,
            MemoryBank(first.contract, BankRows(features, soft), BankSettings(class_names=CLASSES, image_size=SIZE)),
        ).mask,
    )


def test_an_unreachable_server_is_a_typed_error() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(BankStoreUnavailableError, match=f"127.0.0.1:{port}"):
        MilvusStore.open(f"http://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - started < 10
    with pytest.raises(BankError, match="neither a Milvus Lite file"):
        MilvusStore.connect("milvus.example:19530")


def test_another_models_collection_is_refused(colour_backend, scenes_224, uri) -> None:
    build_bank(_bank(colour_backend, scenes_224[:1]), uri=uri)
    other = ModelContract.for_arch("vit_small_patch14_dinov2")  # same width, another encoder
    assert other.embed_dim == colour_backend.contract.embed_dim and other != colour_backend.contract
    with pytest.raises(BankContractError, match="rebuild the bank"):
        open_bank(uri, contract=other)
    with pytest.raises(BankContractError):
        segment(ColourBackend(other), scenes_224[0][0], open_bank(uri))
    with pytest.raises(BankStoreError, match="already exists"):
        build_bank(_bank(colour_backend, scenes_224[:1]), uri=uri)
    with pytest.raises(BankError, match="no collection 'missing'"):
        open_bank(uri, collection="missing")


def test_dimension_mismatches_are_typed_errors(colour_backend, scenes_224, uri) -> None:
    bank = build_bank(_bank(colour_backend, scenes_224[:1]), uri=uri)
    with pytest.raises(BankError, match=r"features must be \(N, 384\)"):
        bank.store.insert(len(bank), np.ones((2, 768), np.float32), np.ones((2, 4), np.float32), np.zeros(2, np.int64))
    with pytest.raises(BankError, match=r"queries must be \(Q, 384\)"):
        bank.store.search(np.ones((2, 768), np.float32), 5)
    # A collection whose vectors do not have the width its manifest's model produces.
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field("image_id", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=128)
    schema.add_field("soft", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=4)
    manifest = bank.store.manifest.model_dump_json()
    client.create_collection("narrow", schema=schema, properties={MANIFEST_PROPERTY: manifest})
    with pytest.raises(BankCorruptError, match="dimension 128.*384 dimensions"):
        open_bank(uri, collection="narrow")
    client.create_collection("foreign", schema=schema)
    with pytest.raises(BankStoreError, match="not a memory bank of this project"):
        open_bank(uri, collection="foreign")
    with pytest.raises(BankStoreError, match="not a memory bank"):  # overwrite never drops a foreign collection
        build_bank(_bank(colour_backend, scenes_224[:1]), uri=uri, collection="foreign", overwrite=True)


def test_float16_vectors_on_milvus_lite_are_refused_clearly(colour_backend, scenes_224, uri) -> None:
    with pytest.raises(BankStoreError, match="Milvus Lite has no FLOAT16 vectors"):
        build_bank(_bank(colour_backend, scenes_224[:1]), uri=uri, vector_dtype="float16")


def test_pymilvus_is_imported_lazily_and_its_absence_names_the_extra(monkeypatch) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, neco.client.stores.milvus; print('pymilvus' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # makes `import pymilvus` fail
    with pytest.raises(ImportError, match=r"install the `milvus` extra"):
        MilvusStore.connect("x.db")
