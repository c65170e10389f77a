"""Dense-feature inference throughput: PyTorch eager vs onnxruntime FP32 vs onnxruntime INT8.

    python benchmarks/inference.py                       # CPU, random-init ViT-S/14-reg, ~3-5 min
    python benchmarks/inference.py --source DIR_OR_TIMM  # real weights (cosines then mean something)
    python benchmarks/inference.py --device cuda         # eager fp32 vs bf16 vs ORT-CUDA FP16

All runtimes are measured side by side in one process on the same generated images, at 224²
and 448², batch 1 and 8. The ONNX graphs are produced by the project's own export path
(dynamo export -> onnxslim -> optional FP16/INT8), so the numbers describe what Triton serves;
`--attention-opset 23` adds the same graphs exported at opset 23, where each block's attention
is one `Attention` node instead of MatMul/Softmax/MatMul.

On CPU the run also measures the machine's GEMM ceiling at the ViT's MLP shape (torch FP32,
onnxruntime FP32, U8S8 and S8S8 MatMulInteger): a ViT forward is ~75% GEMM, so these ratios
bound what any runtime or precision can gain over eager on this CPU.
Writes a table to stdout and the result file (`benchmarks/common.py` schema) to
benchmarks/results/inference_<device>.json: `settings` holds the weights and runtime options,
`results` maps "rows" (one per size and batch: images/s, cosine vs eager and speed-up of every
runtime) and, on CPU, "gemm_ceiling_gflops"; `goal` is null. `machine` adds the torch threads,
onnxruntime providers and the load average at the end of the run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import default_path, machine_info, make_result, write_result

from neco.contract import ModelContract
from neco.export.config import OnnxSettings, QuantizationSettings
from neco.export.onnx_export import export_onnx, simplify_onnx
from neco.export.parity import generated_images, mean_patch_cosine, ort_features, ort_session
from neco.export.precision import convert_fp16, convert_int8
from neco.model import DenseFeatureModel

SIZES = (224, 448)
GEMM_TOKENS = 8 * 261  # batch 8 at 224²: 256 patches + CLS + 4 registers
BATCHES = (1, 8)


def images_per_second(
    run: Callable[[np.ndarray], object], images: np.ndarray, min_seconds: float, min_iters: int
) -> float:
    """One warm-up call, then repeat until both the time and iteration floors are met."""
    run(images)
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        run(images)
        iters += 1
    return iters * len(images) / (time.perf_counter() - start)


def torch_runner(
    model: DenseFeatureModel, device: str, dtype: torch.dtype | None, autograd: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """Eager PyTorch; ``autograd=True`` leaves grad tracking on, as a plain ``model(x)`` call does.

    The speed-ups are taken against ``inference_mode`` (the fair baseline); the autograd column
    shows how much of a "2x" claim comes from forgetting it.
    """
    grad_mode = torch.enable_grad if autograd else torch.inference_mode

    def run(images: np.ndarray) -> np.ndarray:
        with grad_mode(), torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(torch.from_numpy(images).to(device))[0]
        return out.detach().float().cpu().numpy()

    return run


def gemm_ceiling(contract: ModelContract, work: Path, threads: int, spinning: bool) -> dict[str, float]:
    """GFLOP/s (GOP/s for integer) of one [tokens, C] x [C, 4C] product, the ViT's fc1 shape.

    Measured in the same process as the model timings, so the ratios between them are the
    upper bound on what ONNX Runtime FP32 or INT8 can gain over eager PyTorch on this CPU.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tokens = GEMM_TOKENS
    rng = np.random.default_rng(0)
    k, n = contract.embed_dim, 4 * contract.embed_dim
    flops = 2.0 * tokens * k * n

    def ort_gemm(op: str, x_type: int, x: np.ndarray, w: np.ndarray) -> Callable[[], object]:
        out_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
        graph = helper.make_graph(
            [helper.make_node(op, ["x", "w"], ["y"])],
            "gemm",
            [helper.make_tensor_value_info("x", x_type, [tokens, k])],
            [helper.make_tensor_value_info("y", out_type, [tokens, n])],
            [numpy_helper.from_array(w, "w")],
        )
        path = work / f"gemm_{op}_{x_type}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        session = ort_session(path, threads=threads, spinning=spinning)  # the model sessions' options
        return lambda: session.run(None, {"x": x})

    def rate(fn: Callable[[], object], iters: int = 20) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return flops * iters / (time.perf_counter() - start) / 1e9

    x32 = rng.standard_normal((tokens, k), dtype=np.float32)
    w32 = rng.standard_normal((k, n), dtype=np.float32)
    xu8 = rng.integers(0, 256, (tokens, k), dtype=np.uint8)
    w8 = rng.integers(-127, 128, (k, n), dtype=np.int8)
    xt, wt = torch.from_numpy(x32), torch.from_numpy(w32)
    result = {
        "torch_fp32": rate(lambda: xt @ wt),
        "ort_fp32": rate(ort_gemm("MatMul", TensorProto.FLOAT, x32, w32)),
        "ort_u8s8": rate(ort_gemm("MatMulInteger", TensorProto.UINT8, xu8, w8)),
        "ort_s8s8": rate(ort_gemm("MatMulInteger", TensorProto.INT8, xu8.view(np.int8), w8)),
    }
    result["u8s8_over_fp32"] = result["ort_u8s8"] / result["ort_fp32"]
    result["ort_fp32_over_torch_fp32"] = result["ort_fp32"] / result["torch_fp32"]
    return result


def build_models(
    model: DenseFeatureModel, work: Path, int8_modes: list[str], fp16: bool, attention_opset: int | None
) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for opset, suffix in [(18, "")] + ([(attention_opset, f"_opset{attention_opset}")] if attention_opset else []):
        t0 = time.perf_counter()
        raw = export_onnx(model, work / f"fp32{suffix}_raw.onnx", OnnxSettings(simplify=False, opset=opset))
        fp32 = paths[f"fp32{suffix}"] = simplify_onnx(raw, work / f"fp32{suffix}.onnx")
        print(f"opset {opset}: exported + simplified in {time.perf_counter() - t0:.0f}s", flush=True)
        for mode in int8_modes:
            paths[f"int8_{mode}{suffix}"] = convert_int8(
                fp32, work / f"int8_{mode}{suffix}.onnx", QuantizationSettings(mode=mode, calibration_images=8)
            )
        if fp16:
            paths[f"fp16{suffix}"] = convert_fp16(fp32, work / f"fp16{suffix}.onnx")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--source", help="weights (artefact dir / timm id); default random-init")
    parser.add_argument("--arch", default="vit_small_patch14_reg4_dinov2")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (CPU)")
    parser.add_argument("--no-spin", action="store_true", help="onnxruntime threads do not busy-wait (shared machines)")
    parser.add_argument(
        "--int8-modes",
        nargs="*",
        default=["dynamic", "static"],
        choices=["dynamic", "static"],
        help="static (QDQ, calibrated on 8 generated scenes) adds ~40 s of calibration",
    )
    parser.add_argument(
        "--attention-opset",
        type=int,
        choices=[23],
        default=None,
        help="also export at this opset (one Attention node per block) and time it side by side",
    )
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--min-iters", type=int, default=2)
    args = parser.parse_args()

    if args.source:
        from neco.model import load_backbone

        backbone, contract = load_backbone(args.source)
    else:
        from neco.model.testing import random_backbone

        backbone, contract = random_backbone(args.arch, seed=0), ModelContract.for_arch(args.arch)
    model = DenseFeatureModel(backbone, contract).eval()
    # Load average before the timed work, and what decides these numbers here: threads, providers.
    info = {**machine_info(), "torch_threads": torch.get_num_threads(), "ort_providers": ort.get_available_providers()}
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(
            model, Path(tmp), [] if cuda else args.int8_modes, fp16=cuda, attention_opset=args.attention_opset
        )
        runners: dict[str, Callable] = {}
        extra: dict[str, object] = {}  # results beside the rows
        if cuda:
            model_gpu = model.to("cuda")
            runners["eager_fp32"] = torch_runner(model_gpu, "cuda", None)
            runners["eager_bf16"] = torch_runner(model_gpu, "cuda", torch.bfloat16)
            if "CUDAExecutionProvider" in info["ort_providers"]:
                runners["ort_cuda_fp16"] = ort_features(ort_session(paths["fp16"], ["CUDAExecutionProvider"]))
            else:
                extra["ort_cuda_fp16"] = "skipped: this onnxruntime build has no CUDAExecutionProvider"
        else:
            runners["eager_fp32"] = torch_runner(model, "cpu", None)
            runners["eager_fp32_autograd"] = torch_runner(model, "cpu", None, autograd=True)
            for key, path in paths.items():
                runners[f"ort_{key}"] = ort_features(ort_session(path, threads=args.threads, spinning=not args.no_spin))
            extra["gemm_ceiling_gflops"] = gemm_ceiling(contract, Path(tmp), args.threads, not args.no_spin)

        rows = []
        for size in SIZES:
            quality_images = generated_images(2, (size, size), seed=size)
            reference = runners["eager_fp32"](quality_images)
            cosines = {name: mean_patch_cosine(run(quality_images), reference) for name, run in runners.items()}
            for batch in BATCHES:
                images = generated_images(batch, (size, size), seed=batch)
                row = {"size": size, "batch": batch}
                for name, run in runners.items():
                    row[name] = images_per_second(run, images, args.min_seconds, args.min_iters)
                    row[f"{name}_cosine_vs_eager"] = cosines[name]
                for name in runners:
                    row[f"{name}_speedup"] = row[name] / row["eager_fp32"]
                rows.append(row)
                print(
                    "  ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                        if not k.endswith("_cosine_vs_eager")
                    ),
                    flush=True,
                )

    names = list(runners)
    print(f"\nimages/s ({args.device}; speed-up vs eager in brackets; weights: {args.source or 'random-init'})")
    print(f"{'size':>5} {'batch':>5} " + " ".join(f"{n:>22}" for n in names))
    for row in rows:
        cells = " ".join(f"{row[n]:>13.2f} ({row[n + '_speedup']:4.2f}x)" for n in names)
        print(f"{row['size']:>5} {row['batch']:>5} {cells}")
    info["load_average_1_5_15min_at_end"] = list(os.getloadavg())
    print(
        f"load average start {info['load_average_1_5_15min']}, end {info['load_average_1_5_15min_at_end']}"
        f" on {info['cpu_count']} CPUs"
    )
    if "gemm_ceiling_gflops" in extra:
        ceiling = extra["gemm_ceiling_gflops"]
        print(
            f"GEMM ceiling [{GEMM_TOKENS}x{contract.embed_dim}]x[{contract.embed_dim}x{4 * contract.embed_dim}]: "
            + ", ".join(f"{k}={v:.1f}" for k, v in ceiling.items())
        )
    print("mean per-patch cosine vs eager: " + ", ".join(f"{n}={rows[-1][n + '_cosine_vs_eager']:.5f}" for n in names))
    settings = {
        "device": args.device,
        "weights": args.source or f"random-init {args.arch} (LayerScale ~U(0.2, 1))",
        "sizes": list(SIZES),
        "batches": list(BATCHES),
        "ort_intra_op_threads": args.threads,
        "ort_spinning": not args.no_spin,
        "int8_modes": [] if cuda else args.int8_modes,
        "attention_opset": args.attention_opset,
        "min_seconds": args.min_seconds,
        "min_iters": args.min_iters,
        "gemm_tokens": GEMM_TOKENS,
    }
    document = make_result("inference", settings, {"rows": rows, **extra}, goal=None, machine=info)
    write_result(document, default_path("inference", args.device))


if __name__ == "__main__":
    main()
