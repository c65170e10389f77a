"""Bank stores side by side: Milvus Lite (FLAT) vs faiss flat, IVF and HNSW on one synthetic bank.

The bank: `--n` unit vectors of `--dim` (384 = ViT-S/14) drawn around `--clusters` random
centres (patch features cluster by class and texture; uniform random vectors would make every
approximate index look worse than it is on real banks). Queries are drawn the same way.

For each store: build time (Milvus: create + insert every row; faiss: `IndexSpec.create`,
which trains IVF), the time to search one batch of `--queries` queries for the `--k` nearest
by inner product (median of `--repeats`; 256 queries = one 224 px image's patches), and
recall@k against exact faiss flat search. Milvus runs through `neco.client.stores.milvus`
(the bank's store), faiss through `neco.client.IndexSpec` (the bank's index), so these are the
code paths `segment()` uses. Results: a list of rows, one per store, in
benchmarks/results/bank_stores_<device>.json (see benchmarks/common.py for the schema).

    python benchmarks/bank_stores.py [--n 1000000] [--queries 256] [--stores milvus flat ivf hnsw]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from common import default_path, machine_info, make_result, write_result  # benchmarks/ is the script's folder

from neco.client import IndexSpec
from neco.contract import DEFAULT_K, ModelContract

ARCH = "vit_small_patch14_reg4_dinov2"
STORES = ("milvus", "flat", "ivf", "hnsw")
CHUNK = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="patches in the bank")
    parser.add_argument("--dim", type=int, default=ModelContract.for_arch(ARCH).embed_dim)
    parser.add_argument("--clusters", type=int, default=1000, help="cluster centres the patches are drawn around")
    parser.add_argument("--spread", type=float, default=0.6, help="noise norm around a centre (before normalising)")
    parser.add_argument("--queries", type=int, default=256, help="queries per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed query batches per store")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    parser.add_argument("--nlist", type=int, default=IndexSpec().nlist)
    parser.add_argument("--nprobe", type=int, default=IndexSpec().nprobe)
    parser.add_argument("--hnsw-m", type=int, default=IndexSpec().hnsw_m)
    parser.add_argument("--ef-search", type=int, default=IndexSpec().ef_search)
    parser.add_argument("--milvus-uri", default=None, help="Milvus Lite file or server URI (default: a temp file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=default_path("bank_stores"))
    return parser.parse_args(argv)


def clustered_unit_vectors(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    """n unit vectors, each a random centre plus isotropic noise of norm about `spread`."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, CHUNK):  # chunks keep the float64 temporaries small
        stop = min(start + CHUNK, n)
        noise = rng.standard_normal((stop - start, centres.shape[1])) * (spread / np.sqrt(centres.shape[1]))
        rows = centres[rng.integers(0, len(centres), stop - start)] + noise
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact k nearest that a store returned."""
    return float(np.mean([np.intersect1d(f, t).size / t.size for f, t in zip(found, truth)]))


def time_queries(search: Any, queries: np.ndarray, k: int, repeats: int) -> tuple[list[float], np.ndarray]:
    """Wall times of `repeats` searches of the whole batch, and the ids of the last one."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = search(queries, k)
        times.append(time.perf_counter() - start)
    return times, ids


def run_faiss(kind: str, spec: IndexSpec, bank: np.ndarray, queries: np.ndarray, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    index = spec.model_copy(update={"kind": kind}).create(bank)
    build = time.perf_counter() - start
    times, ids = time_queries(index.search, queries, args.k, args.repeats)
    return {"store": f"faiss_{kind}", "build_s": build, "query_batch_s": times, "ids": ids}


def run_milvus(uri: str, bank: np.ndarray, queries: np.ndarray, args: argparse.Namespace) -> dict:
    from neco.client.stores.milvus import MilvusStore  # needs the `milvus` extra

    contract = ModelContract.for_arch(ARCH)
    if contract.embed_dim != args.dim:
        raise SystemExit(
            f"--dim {args.dim} differs from {ARCH}'s {contract.embed_dim}: Milvus stores a bank's contract"
        )
    start = time.perf_counter()
    store = MilvusStore.create(contract, ["a", "b"], uri=uri, collection="bench", overwrite=True)
    soft = np.zeros((CHUNK, 2), dtype=np.float32)
    soft[:, 0] = 1
    for first in range(0, len(bank), CHUNK):
        rows = bank[first : first + CHUNK]
        store.insert(first, rows, soft[: len(rows)], np.arange(first, first + len(rows)) // 256)
    build = time.perf_counter() - start
    try:
        times, ids = time_queries(store.search, queries, args.k, args.repeats)
    finally:
        store.drop()
        store.close()
    return {
        "store": "milvus_lite_flat" if uri.endswith(".db") else "milvus_flat",
        "build_s": build,
        "query_batch_s": times,
        "ids": ids,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()  # load average before the timed work
    for name in ("pymilvus", "milvus-lite"):
        try:
            machine["packages"][name] = version(name)
        except PackageNotFoundError:
            machine["packages"][name] = None
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bank = clustered_unit_vectors(rng, centres, args.n, args.spread)
    queries = clustered_unit_vectors(rng, centres, args.queries, args.spread)
    truth = IndexSpec().create(bank).search(queries, args.k)[1]  # exact inner product
    spec = IndexSpec(nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search)

    rows = []
    for store in args.stores:
        print(f"{store}: building a bank of {args.n} x {args.dim} ...", flush=True)
        if store == "milvus":
            with tempfile.TemporaryDirectory() as tmp:
                row = run_milvus(args.milvus_uri or str(Path(tmp) / "bench.db"), bank, queries, args)
        else:
            row = run_faiss(store, spec, bank, queries, args)
        median = statistics.median(row["query_batch_s"])
        rows.append(
            {
                "store": row["store"],
                "n": args.n,
                "build_s": round(row["build_s"], 3),
                "query_batch_s": [round(t, 4) for t in row["query_batch_s"]],
                "query_batch_median_s": round(median, 4),
                "ms_per_query": round(1000 * median / args.queries, 3),
                f"recall_at_{args.k}": round(recall(row["ids"], truth), 4),
            }
        )

    print(f"\nbank of {args.n} x {args.dim}, {args.clusters} clusters, batches of {args.queries} queries, k={args.k}")
    print(f"{'store':<18}{'build s':>10}{'batch s':>10}{'ms/query':>10}{f'recall@{args.k}':>11}")
    for row in rows:
        print(
            f"{row['store']:<18}{row['build_s']:>10.2f}{row['query_batch_median_s']:>10.3f}"
            f"{row['ms_per_query']:>10.3f}{row[f'recall_at_{args.k}']:>11.4f}"
        )
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    # faiss searches batches below this many queries without BLAS (faiss-cpu 1.15.1: 128000).
    settings["faiss_blas_threshold"] = int(faiss.cvar.distance_compute_blas_threshold)
    write_result(make_result("bank_stores", settings, rows, machine=machine), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
