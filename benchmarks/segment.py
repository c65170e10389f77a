"""Benchmark `segment()`'s retrieval against bare faiss, and bank bytes against raw fp16 features.

For banks of 10k, 100k and 1M patches (dim 384, fp16 storage, 21 classes like Pascal VOC),
one query image of 448x448 (32x32 = 1024 patches) is segmented with k = 30 by
`neco.client.segment_features` (search + softmax label transfer + bilinear upsampling to
448x448 + argmax), and the same queries are searched by a bare `faiss.IndexFlatIP` holding
the same vectors. Runs alternate between the two so drift hits both alike; the median of
the per-round ratios is reported, with the process CPU-time ratio too (steadier when other jobs share the cores).
Bank bytes are the saved bank folder (arrays + manifest) against N x 384 x 2.

Goals: segment time <= 1.2x faiss time; bank bytes <= 1.2x raw fp16 features.

The result file (`benchmarks/common.py` schema): `settings` holds the bank and query setup,
`results` one row per bank size, `goal` the two limits and whether each (and both) was met.
`machine` adds faiss's thread count and the load average at the end of the run.

    python benchmarks/segment.py [--sizes 10000 100000 1000000] [--rounds 15 5 2] [--out benchmarks/results/segment_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from common import default_path, machine_info, make_result, write_result

from neco.client import MemoryBank
from neco.client.bank import BankRows, BankSettings
from neco.client.retrieval import segment_features
from neco.contract import DEFAULT_INPUT_SIZE, DEFAULT_K, ModelContract

DIM = 384
IMAGE = DEFAULT_INPUT_SIZE
ARCH = "vit_small_patch14_reg4_dinov2"
GRID = IMAGE // ModelContract.for_arch(ARCH).patch_size  # 32 patches a side
K = DEFAULT_K
GOAL_RATIO = 1.2
CLASSES = 21


def random_bank(size: int, rng: np.random.Generator) -> MemoryBank:
    """Unit-norm random features (fp16) with peaked random soft labels (mostly one class per patch)."""
    features = np.empty((size, DIM), dtype=np.float16)
    for start in range(0, size, 100_000):  # chunked: 1M x 384 float32 at once would need 1.5 GB extra
        block = rng.standard_normal((min(100_000, size - start), DIM), dtype=np.float32)
        features[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    soft = np.zeros((size, CLASSES), dtype=np.float16)
    soft[np.arange(size), rng.integers(0, CLASSES, size)] = 0.75
    soft[np.arange(size), rng.integers(0, CLASSES, size)] += 0.25
    settings = BankSettings(class_names=[f"class_{i}" for i in range(CLASSES)], dtype="float16")
    return MemoryBank(ModelContract.for_arch(ARCH), BankRows(features, soft), settings)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def bench_one(size: int, repeats: int, warmup: bool, rng: np.random.Generator) -> dict[str, object]:
    bank = random_bank(size, rng)
    queries = rng.standard_normal((GRID * GRID, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    grid = queries.reshape(GRID, GRID, DIM)

    reference = faiss.IndexFlatIP(DIM)
    reference.add(bank.features.astype(np.float32))  # the same vectors the bank searches
    _ = bank.index  # build the bank's index outside the timed region, as a loaded bank would

    seg_times, faiss_times, seg_cpu, faiss_cpu = [], [], [], []
    for run in range(repeats + int(warmup)):
        wall, cpu = time.perf_counter(), time.process_time()
        result = segment_features(grid, bank, (IMAGE, IMAGE), k=K)
        seg, seg_c = time.perf_counter() - wall, time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        _, ref_idx = reference.search(queries, K)
        ref, ref_c = time.perf_counter() - wall, time.process_time() - cpu
        if run or not warmup:
            seg_times.append(seg)
            faiss_times.append(ref)
            seg_cpu.append(seg_c)
            faiss_cpu.append(ref_c)
    assert result.mask.shape == (IMAGE, IMAGE)
    _, bank_idx = bank.search(queries[:64], K)
    same_neighbours = float((np.sort(bank_idx, axis=1) == np.sort(ref_idx[:64], axis=1)).mean())

    with tempfile.TemporaryDirectory() as tmp:
        bank.save(Path(tmp) / "bank")
        disk = folder_bytes(Path(tmp) / "bank")
    raw_fp16 = size * DIM * 2
    seg_med, faiss_med = statistics.median(seg_times), statistics.median(faiss_times)
    return {
        "bank_patches": size,
        "segment_s": seg_med,
        "faiss_flat_ip_s": faiss_med,
        "time_ratio": statistics.median(s / f for s, f in zip(seg_times, faiss_times)),  # paired rounds
        "segment_cpu_s": statistics.median(seg_cpu),
        "faiss_cpu_s": statistics.median(faiss_cpu),
        "cpu_time_ratio": statistics.median(s / f for s, f in zip(seg_cpu, faiss_cpu)),
        "segment_runs_s": seg_times,
        "faiss_runs_s": faiss_times,
        "neighbours_identical_to_faiss": same_neighbours,
        "bank_bytes_on_disk": disk,
        "raw_fp16_bytes": raw_fp16,
        "bytes_ratio": disk / raw_fp16,
        "bank_bytes_in_memory": bank.nbytes + bank.index.ntotal * DIM * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--rounds",
        type=int,
        nargs="+",
        default=[15, 5, 2],
        help="timed rounds per size (cheap small banks get more: their ratio is the noisiest)",
    )
    parser.add_argument("--out", type=Path, default=default_path("segment"))
    args = parser.parse_args()

    machine = {**machine_info(), "faiss_threads": faiss.omp_get_max_threads()}  # load average before the timed work
    rng = np.random.default_rng(0)
    rows = []
    print(
        f"{'patches':>10} {'segment ms':>11} {'faiss ms':>9} {'time x':>7} {'cpu x':>6} {'bank MB':>8} {'fp16 MB':>8} {'bytes x':>8}"
    )
    if len(args.rounds) != len(args.sizes):
        parser.error(f"--rounds needs one count per size ({len(args.sizes)})")
    for size, rounds in zip(args.sizes, args.rounds):
        row = bench_one(size, rounds, size < 1_000_000, rng)  # a 1M search takes seconds: no warm-up
        rows.append(row)
        print(
            f"{size:>10} {row['segment_s'] * 1e3:>11.1f} {row['faiss_flat_ip_s'] * 1e3:>9.1f} "
            f"{row['time_ratio']:>7.3f} {row['cpu_time_ratio']:>6.3f} {row['bank_bytes_on_disk'] / 1e6:>8.1f} "
            f"{row['raw_fp16_bytes'] / 1e6:>8.1f} {row['bytes_ratio']:>8.3f}"
        )
    machine["load_average_1_5_15min_at_end"] = list(os.getloadavg())  # other jobs on the machine inflate times
    settings = {
        "dim": DIM,
        "k": K,
        "query": f"{IMAGE}x{IMAGE} image = {GRID}x{GRID} patches",
        "classes": CLASSES,
        "storage": "float16",
        "index": "flat (IndexFlatIP)",
        "timed_rounds": dict(zip(map(str, args.sizes), args.rounds)),
    }
    met = {
        "time": all(r["time_ratio"] <= GOAL_RATIO for r in rows),
        "bytes": all(r["bytes_ratio"] <= GOAL_RATIO for r in rows),
    }
    goal = {"time_ratio_max": GOAL_RATIO, "bytes_ratio_max": GOAL_RATIO, "met_each": met, "met": all(met.values())}
    print(f"goals met: {met}")
    write_result(make_result("segment", settings, rows, goal=goal, machine=machine), args.out)


if __name__ == "__main__":
    main()
