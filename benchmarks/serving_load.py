"""Load test of the embedded Triton: concurrent clients, mixed sizes and protocols, every answer checked.

`--clients` threads (default 16) each loop for `--seconds` (default 60) over a pool of
requests of mixed image sizes and batch sizes, alternating HTTP and gRPC by client. Every
served `features` tensor is compared with onnxruntime run in this process on the same
images (computed before the load starts, with a session independent of `neco.serving`).
The server runs with a short queue (`--queue`, default 4), so overload happens and must be
answered with Triton's retryable UNAVAILABLE / HTTP 503, never with a hang or a wrong answer.

Results (a mapping): requests/s of answered requests, p50 / p99 latency in ms, counts of
answered, wrong, overloaded (retryable) and failed requests, and the server tree's RSS
(tritonserver + stub + helpers) before and after the load.

    python benchmarks/serving_load.py [--repository DIR] [--seconds 60] [--clients 16]
        [--out benchmarks/results/serving_load_cpu.json]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neco.contract import DEFAULT_MODEL_NAME, INPUT_IMAGES, OUTPUT_FEATURES
from neco.signature import INPUT
from neco.triton_config import ONNX_FILENAME

SIDES: tuple[tuple[int, int], ...] = ((4, 4), (8, 8), (4, 10), (16, 16))
"""Image sizes in patches (rows, columns): 56x56 up to 224x224 px."""
BATCHES: tuple[int, ...] = (1, 2)
ATOL = 1e-4
OVERLOAD_MARKERS = ("Exceeds maximum queue size", "Request timeout expired")


def build_pool(
    reference: Callable[[np.ndarray], np.ndarray], patch_size: int, batches: Sequence[int] = BATCHES, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images, expected features) for every size x batch (sides in patches of the served model)."""
    rng = np.random.default_rng(seed)
    pool = []
    for rows, cols in SIDES:
        for batch in batches:
            images = rng.integers(0, 256, (batch, rows * patch_size, cols * patch_size, 3), dtype=np.uint8)
            pool.append((images, reference(images)))
    return pool


def rss_bytes(pids: Sequence[int]) -> int:
    """Summed VmRSS of the live `pids` (from /proc)."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:"))
    return total


def _client(protocol: str, url: str, model: str, pool, stop: threading.Event, out: dict[str, list]) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(url)
    index = 0
    try:
        while not stop.is_set():
            images, expected = pool[index % len(pool)]
            index += 1
            tensor = module.InferInput(INPUT_IMAGES, list(images.shape), INPUT.triton_dtype)
            tensor.set_data_from_numpy(images)
            started = time.perf_counter()
            try:
                result = client.infer(model, [tensor], outputs=[module.InferRequestedOutput(OUTPUT_FEATURES)])
            except InferenceServerException as exc:
                text = f"{exc.status()} {exc.message()}"
                kind = "overloaded" if any(m in text for m in OVERLOAD_MARKERS) else "failed"
                out[kind].append(text[:200])
                continue
            latency = time.perf_counter() - started
            served = result.as_numpy(OUTPUT_FEATURES)
            correct = served is not None and served.shape == expected.shape and np.allclose(served, expected, atol=ATOL)
            out["latency_s" if correct else "wrong"].append(latency)
    finally:
        client.close()


def run_load(server: Any, pool, clients: int = 16, seconds: float = 60.0) -> dict[str, Any]:
    """Drive `server` (an `EmbeddedServer`) with `clients` threads for `seconds`; the summary."""
    outcomes: list[dict[str, list]] = [
        {"latency_s": [], "wrong": [], "overloaded": [], "failed": []} for _ in range(clients)
    ]
    stop = threading.Event()
    rss_before = rss_bytes(server.process_ids())
    threads = [
        threading.Thread(
            target=_client,
            args=(
                "grpc" if i % 2 else "http",
                server.grpc_url if i % 2 else server.http_url,
                server.model_name,
                pool,
                stop,
                outcomes[i],
            ),
        )
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    merged = {key: [v for o in outcomes for v in o[key]] for key in outcomes[0]}
    latencies_ms = np.asarray(merged["latency_s"]) * 1e3
    return {
        "answered": len(latencies_ms),
        "wrong": len(merged["wrong"]),
        "overloaded_retryable": len(merged["overloaded"]),
        "failed": len(merged["failed"]),
        "failed_examples": merged["failed"][:5],
        "requests_per_s": round(len(latencies_ms) / wall, 2),
        "latency_p50_ms": round(float(np.percentile(latencies_ms, 50)), 1) if len(latencies_ms) else None,
        "latency_p99_ms": round(float(np.percentile(latencies_ms, 99)), 1) if len(latencies_ms) else None,
        "wall_s": round(wall, 1),
        "server_rss_mib_before": round(rss_before / 2**20, 1),
        "server_rss_mib_after": round(rss_bytes(server.process_ids()) / 2**20, 1),
        "server_alive": server.is_alive(),
        "backend_failures": server.backend_failures,
    }


def ort_reference(onnx_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """`features` of onnxruntime run directly on the exported file (no neco.serving code)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT_FEATURES], {INPUT_IMAGES: images})[0]


def served_patch_size(repository: Path) -> int:
    """The patch size of the default model in `repository`, from its exported contract."""
    from neco.triton_config import contract_from_config, read_model_config

    return contract_from_config(read_model_config(repository / DEFAULT_MODEL_NAME)).patch_size


def find_onnx(repository: Path) -> Path:
    """The newest version's ONNX file of the default model in `repository`."""
    versions = sorted((repository / DEFAULT_MODEL_NAME).glob(f"*/{ONNX_FILENAME}"), key=lambda p: int(p.parent.name))
    if not versions:
        raise FileNotFoundError(f"{repository}/{DEFAULT_MODEL_NAME} has no <version>/{ONNX_FILENAME}")
    return versions[-1]


def main() -> None:
    from common import default_path, make_result, write_result

    from neco.serving import EmbeddedServer, ServeConfig
    from serving import export_random_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=None, help="reuse an exported repository")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queue", type=int, default=4, help="max_queue_size of the served model")
    parser.add_argument("--out", type=Path, default=default_path("serving_load"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = args.repository or export_random_model(Path(tmp))
        patch = served_patch_size(repository)
        pool = build_pool(ort_reference(find_onnx(repository)), patch)
        cfg = ServeConfig(repository=repository, http_port=0, grpc_port=0, metrics_port=0, max_queue_size=args.queue)
        with EmbeddedServer(cfg) as server:
            results = run_load(server, pool, args.clients, args.seconds)
    settings = {
        "clients": args.clients, "seconds": args.seconds, "max_queue_size": args.queue,
        "sides_px": [[r * patch, c * patch] for r, c in SIDES], "batches": list(BATCHES),
        "protocols": "even clients HTTP, odd clients gRPC", "atol": ATOL,
    }  # fmt: skip
    goal = {
        "target": "0 wrong, 0 failed (overload only as retryable UNAVAILABLE), server alive",
        "met": results["wrong"] == 0 and results["failed"] == 0 and results["server_alive"],
    }
    write_result(make_result("serving_load", settings, results, goal), args.out)


if __name__ == "__main__":
    main()
