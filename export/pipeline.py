"""`run_export`: weights -> checked ONNX (FP32/FP16/INT8) or TensorRT plan -> Triton model dir.

Steps, each reported on stderr: load weights; export FP32 ONNX (dynamo, dynamic B/H/W);
optionally simplify with onnxslim; check FP32 parity against PyTorch at every configured
shape; convert to the served precision and measure its cosine parity against FP32; build a
strongly typed TensorRT engine from that graph when asked; write config.pbtxt + model +
`export_report.json` atomically. All work happens in a temporary directory, so a failure at
any step leaves the repository as it was.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neco.contract import ModelContract
from neco.export.config import ExportConfig
from neco.export.errors import ParityError
from neco.export.repository import ensure_writable_repository, write_model_directory
from neco.triton_config import ONNX_FILENAME, build_model_config

REPORT_FILENAME = "export_report.json"

Progress = Callable[[str], None]


def stderr_progress() -> Progress:
    """Numbered, timed progress lines on stderr (stdout stays free for machine output)."""
    start = time.perf_counter()

    def report(message: str) -> None:
        print(f"[export {time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def preflight(cfg: ExportConfig) -> None:
    """Checks that cost nothing, done before loading weights or exporting anything."""
    ensure_writable_repository(cfg.output, cfg.model_name, cfg.overwrite)
    if cfg.backend == "tensorrt":
        from neco.export.tensorrt import require_tensorrt

        require_tensorrt()


def run_export(cfg: ExportConfig, progress: Progress | None = None) -> Path:
    """Load `cfg.source` and export it; returns `<cfg.output>/<cfg.model_name>`."""
    from neco.model import WeightsError, load_backbone

    progress = progress or stderr_progress()
    preflight(cfg)
    progress(f"loading weights from {cfg.source}")
    try:
        backbone, contract = load_backbone(cfg.source, cfg.arch)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # corrupt safetensors/pickles raise library-specific types
        raise WeightsError(f"cannot load weights from {cfg.source!r}: {exc}") from exc
    return export_model(backbone, contract, cfg, progress, source=cfg.source)


def export_model(
    backbone: Any,
    contract: ModelContract,
    cfg: ExportConfig,
    progress: Progress | None = None,
    *,
    source: str = "<in-memory model>",
) -> Path:
    """Export an already-built timm backbone with its contract (what the fixtures use)."""
    from neco.export.onnx_export import export_onnx, opset_of, simplify_onnx
    from neco.export.parity import compare, ort_features, ort_session, shape_grid, torch_features
    from neco.model import DenseFeatureModel

    progress = progress or stderr_progress()
    preflight(cfg)
    cfg.check_sizes(contract.patch_size)
    model = DenseFeatureModel(backbone.eval(), contract).eval()
    report: dict[str, Any] = {
        "source": source,
        "contract": contract.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json"),
    }
    with tempfile.TemporaryDirectory(prefix="neco-export-") as work_dir:
        work = Path(work_dir)
        progress(f"exporting {contract.arch} to ONNX (opset {cfg.onnx.opset}, dynamic batch/height/width)")
        fp32 = export_onnx(model, work / "model_fp32.onnx", cfg.onnx)
        if cfg.onnx.simplify:
            progress("simplifying with onnxslim")
            fp32 = simplify_onnx(fp32, work / "model_fp32_slim.onnx")
        report["onnx"] = {"opset": opset_of(fp32), "simplified": cfg.onnx.simplify}
        grid = shape_grid(cfg.parity.sizes, cfg.parity.batch_sizes)
        fp32_session = (
            ort_session(fp32, cfg.parity.providers) if cfg.parity.enabled else None
        )  # the reference for later checks
        if cfg.parity.enabled:
            progress(f"FP32 parity vs PyTorch at {len(grid)} shapes")
            parity = compare(
                ort_features(fp32_session),
                torch_features(model),
                grid,
                seed=cfg.parity.seed,
                patch_size=contract.patch_size,
                names=("onnxruntime-fp32", "pytorch"),
            )
            report["parity_fp32"] = {**parity.to_dict(), "providers": fp32_session.get_providers()}
            progress(f"  max abs diff {parity.max_abs_diff:.2e} (limit {cfg.parity.atol:.0e})")
            if parity.max_abs_diff > cfg.parity.atol:
                raise ParityError(f"FP32 ONNX differs from PyTorch by {parity.max_abs_diff:.3e} > {cfg.parity.atol}")
        served = _served_onnx(fp32, fp32_session, cfg, work, report, progress, contract.patch_size)

        files = {ONNX_FILENAME: served}
        extra_parameters = {"precision": cfg.precision}
        if cfg.backend == "tensorrt":
            from neco.export.tensorrt import build_and_check_engine

            progress(f"building a strongly typed TensorRT engine from {served.name}")
            files, trt_report = build_and_check_engine(served, fp32_session, cfg, work, patch_size=contract.patch_size)
            report["tensorrt"] = trt_report
            extra_parameters = {"precision": trt_report["precision"], "tensorrt_engine": trt_report["engine_name"]}

        triton_cfg = build_model_config(cfg.model_name, contract, cfg.triton, cfg.backend, extra_parameters)
        report_path = work / REPORT_FILENAME
        report_path.write_text(json.dumps(report, indent=2, default=str))
        progress(f"writing {cfg.output / cfg.model_name}")
        target = write_model_directory(
            cfg.output,
            triton_cfg,
            files,
            model_dir_files={REPORT_FILENAME: report_path},
            version=cfg.version,
            overwrite=cfg.overwrite,
            move_files=True,
        )
    progress("done")
    return target


def _served_onnx(
    fp32: Path, fp32_session: Any, cfg: ExportConfig, work: Path, report: dict, progress: Progress, patch_size: int
) -> Path:
    """Convert to the served precision and measure its cosine parity against the FP32 graph.

    For backend tensorrt this is the graph the engine is parsed from (strongly typed builds
    take their precision from it), with `TENSORRT_FP32_OPS` kept in FP32.
    """
    from neco.export.parity import compare, ort_features, ort_session, shape_grid
    from neco.export.precision import TENSORRT_FP32_OPS, convert_int8, reduced_precision_onnx

    if cfg.precision == "fp32":
        return fp32
    if cfg.precision == "int8":
        progress(f"quantising to INT8 ({cfg.quantization.mode})")
        converted = convert_int8(fp32, work / "model_int8.onnx", cfg.quantization, cfg.parity.seed)
        limit = cfg.parity.min_cosine_int8
    else:
        keep = TENSORRT_FP32_OPS if cfg.backend == "tensorrt" else ()
        kept = f", {'/'.join(keep)} in FP32" if keep else ""
        progress(f"converting to {cfg.precision.upper()} (FP32 I/O{kept})")
        converted = reduced_precision_onnx(fp32, work / f"model_{cfg.precision}.onnx", cfg.precision, keep)
        limit = cfg.parity.min_cosine_fp16
    if not cfg.parity.enabled:
        return converted
    if cfg.precision == "bf16":
        reason = "onnxruntime has no BF16 kernels for this graph; the engine's parity vs FP32 is the check"
        report["parity_bf16"] = {"skipped": reason}
        progress(f"  BF16 ONNX parity skipped: {reason}")
        return converted
    grid = shape_grid(cfg.parity.sizes, cfg.parity.batch_sizes)
    parity = compare(
        ort_features(ort_session(converted, cfg.parity.providers)),
        ort_features(fp32_session),
        grid,
        seed=cfg.parity.seed,
        patch_size=patch_size,
        names=(f"onnxruntime-{cfg.precision}", "onnxruntime-fp32"),
    )
    report[f"parity_{cfg.precision}"] = {**parity.to_dict(), "providers": fp32_session.get_providers()}
    progress(
        f"  {cfg.precision} mean per-patch cosine vs FP32: min over shapes {parity.min_mean_cosine:.4f} (goal {limit})"
    )
    if parity.min_mean_cosine < limit:
        raise ParityError(f"{cfg.precision} features have mean cosine {parity.min_mean_cosine:.4f} < {limit} to FP32")
    return converted
