"""Benchmark the embedded Triton (HTTP and gRPC) against in-process onnxruntime on one model.

A random-init ViT-S/14-reg4 is exported once with `neco.export` (or `--repository` reuses an
existing one). In-process onnxruntime runs the same `model.onnx` through the very
`OnnxFeatureRunner` the server binds (same session options), called back to back. The
embedded Triton is driven by 1..8 client threads, each with its own tritonclient
connection, at batch 1 and 8, for a fixed time per setting; each served setting is paired
with an in-process run measured just before it, and its ratio uses that pair (machine-load
drift hits both sides alike). Images are 224x224 uint8. Clients, server and the onnxruntime
session share this process and its cores, so the in-process figures are the ceiling.

Goal: at batch 8, Triton end-to-end throughput >= 85% of in-process throughput.

The result file (`benchmarks/common.py` schema): `settings` holds the model and the per-setting
time, `results` one row per measured setting (in-process rows, then served rows with their
paired in-process rate and ratio), `goal` the best batch-8 ratio per protocol and whether it
was met (null when batch 8 was not run).

    python benchmarks/serving.py [--repository DIR] [--seconds 4] [--out benchmarks/results/serving_cpu.json]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import default_path, machine_info, make_result, write_result

from neco.contract import DEFAULT_MODEL_NAME, INPUT_IMAGES, OUTPUT_FEATURES
from neco.signature import INPUT
from neco.triton_config import ONNX_FILENAME

ARCH = "vit_small_patch14_reg4_dinov2"
SIZE = 224
GOAL_RATIO = 0.85


def export_random_model(root: Path) -> Path:
    """Export a seeded random-init backbone (no weights download) into `root`; return it."""
    import torch

    from neco.contract import ModelContract
    from neco.export.config import ExportConfig
    from neco.export.pipeline import export_model
    from neco.model import create_backbone

    torch.manual_seed(0)
    cfg = ExportConfig(
        source=f"random-init {ARCH}", output=root, model_name=DEFAULT_MODEL_NAME,
        parity={"enabled": False}, triton={"instance_kind": "KIND_CPU"},
    )  # fmt: skip
    export_model(create_backbone(ARCH).eval(), ModelContract.for_arch(ARCH), cfg, progress=lambda _m: None)
    return root


def summarise(latencies_s: list[float], images: int, wall_s: float) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    return {
        "images_per_s": images / wall_s,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "requests": len(latencies_s),
    }


def bench_in_process(runner, batch: int, seconds: float, min_requests: int) -> dict[str, float]:
    images = np.random.default_rng(batch).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    runner.run(images)  # warm-up
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < min_requests:
        t0 = time.perf_counter()
        runner.run(images)
        latencies.append(time.perf_counter() - t0)
    return summarise(latencies, batch * len(latencies), time.perf_counter() - start)


def bench_triton(
    server, protocol: str, batch: int, clients: int, seconds: float, min_requests: int
) -> dict[str, float]:
    """`clients` threads send back-to-back requests until the deadline (and at least
    `min_requests` in all have completed); requests in flight finish.

    A failed request is counted, not retried, and ends that client's loop (so a broken setting
    shows up as `errors` in the results instead of a crash or a hang).
    """
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    images = np.random.default_rng(batch).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + seconds

    def client_loop(index: int) -> None:
        client = module.InferenceServerClient(url)
        tensor = module.InferInput(INPUT_IMAGES, list(images.shape), INPUT.triton_dtype)
        tensor.set_data_from_numpy(images)
        outputs = [module.InferRequestedOutput(OUTPUT_FEATURES)]
        try:
            while time.perf_counter() < deadline or sum(map(len, latencies)) < min_requests:
                t0 = time.perf_counter()
                client.infer(server.model_name, [tensor], outputs=outputs)
                latencies[index].append(time.perf_counter() - t0)
        except Exception as exc:  # reported in the results, see docstring
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [value for per_client in latencies for value in per_client]
    result = summarise(flat, batch * len(flat), time.perf_counter() - start)
    return {**result, "errors": len(errors), "first_error": errors[0] if errors else None}


def warm_up(server, batch: int) -> None:
    """One request per batch size so the first timed setting does not pay onnxruntime's first run."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    images = np.zeros((batch, SIZE, SIZE, 3), np.uint8)
    tensor = grpcclient.InferInput(INPUT_IMAGES, list(images.shape), INPUT.triton_dtype)
    tensor.set_data_from_numpy(images)
    client.infer(server.model_name, [tensor])
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=None, help="reuse an exported repository")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per setting")
    parser.add_argument("--min-requests", type=int, default=2, help="timed requests per setting at least")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=default_path("serving"))
    args = parser.parse_args()

    from neco.serving import EmbeddedServer, ServeConfig
    from neco.serving.runtime import OnnxFeatureRunner
    from neco.triton_config import contract_from_config, read_model_config

    machine = machine_info()  # load average before the timed work
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="neco-bench-serving-") as tmp:
        repository = args.repository or export_random_model(Path(tmp))
        onnx_path = repository / DEFAULT_MODEL_NAME / "1" / ONNX_FILENAME
        print(
            f"model: {onnx_path} ({ARCH}, {SIZE}x{SIZE}); {args.seconds:.0f} s / >= {args.min_requests} requests per setting"
        )
        print(
            f"{'path':<12} {'batch':>5} {'clients':>7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs in-proc':>10} errors"
        )
        served = contract_from_config(read_model_config(onnx_path.parent.parent))
        runner = OnnxFeatureRunner(onnx_path, patch_size=served.patch_size)
        # Generous queue bound and timeout: the benchmark measures throughput, not rejection.
        cfg = ServeConfig(repository=repository, http_port=0, grpc_port=0, metrics_port=0,
                          max_queue_size=256, request_timeout_ms=600_000)  # fmt: skip
        with EmbeddedServer(cfg) as server:
            for batch in args.batches:
                warm_up(server, batch)
            for protocol in ("http", "grpc"):
                for batch in args.batches:
                    for clients in args.clients:
                        # Paired: the in-process reference is measured right before each served
                        # setting, so drift in machine load affects both sides of the ratio alike.
                        local = bench_in_process(runner, batch, args.seconds, args.min_requests)
                        result = bench_triton(server, protocol, batch, clients, args.seconds, args.min_requests)
                        ratio = result["images_per_s"] / local["images_per_s"]
                        rows.append({"path": "in-process", "batch": batch, "clients": 1, **local})
                        rows.append({"path": f"triton-{protocol}", "batch": batch, "clients": clients, **result,
                                     "in_process_images_per_s": local["images_per_s"], "ratio": ratio})  # fmt: skip
                        for name, r, shown in (
                            ("in-process", local, ""),
                            (f"triton-{protocol}", result, f"{ratio:.3f}"),
                        ):
                            print(f"{name:<12} {batch:>5} {clients if shown else 1:>7} {r['images_per_s']:>8.1f} "
                                  f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {shown:>10} {r.get('errors', ''):>6}")  # fmt: skip

    served = [r for r in rows if r["path"] != "in-process"]
    goal = None
    if 8 in args.batches:
        best = {p: max((r for r in served if r["path"] == p and r["batch"] == 8), key=lambda r: r["ratio"])
                for p in ("triton-http", "triton-grpc")}  # fmt: skip
        goal = {"target_ratio": GOAL_RATIO,
                "best_batch8": {p: {"clients": r["clients"], "ratio": r["ratio"]} for p, r in best.items()},
                "met": all(r["ratio"] >= GOAL_RATIO for r in best.values())}  # fmt: skip
        for p, r in best.items():
            print(
                f"{p} batch 8: best {r['images_per_s']:.1f} img/s with {r['clients']} clients = {r['ratio']:.1%} of in-process"
            )
        print(f"goal (>= {GOAL_RATIO:.0%} at batch 8 over HTTP and gRPC): {'met' if goal['met'] else 'NOT met'}")
    settings = {
        "model": {"arch": ARCH, "weights": "random-init (seed 0)", "image_size": [SIZE, SIZE], "format": "onnx fp32"},
        "repository": str(args.repository) if args.repository else None,
        "seconds_per_setting": args.seconds,
        "min_requests_per_setting": args.min_requests,
        "clients": args.clients,
        "batches": args.batches,
    }
    write_result(make_result("serving", settings, rows, goal=goal, machine=machine), args.out)


if __name__ == "__main__":
    main()
