"""TensorRT engines from the exported ONNX, named so that a stale engine is never used silently.

A serialized engine only runs on the GPU model and TensorRT version that built it, and only
for shapes inside its optimisation profile. The engine file name therefore encodes all three
(plus precision) and a JSON sidecar records them; `load_engine` refuses a file whose sidecar
does not match the running GPU/TensorRT or the requested profile.

Engines are strongly typed, built by `neco.export.tensorrt_build` (the Python builder, or the
trtexec command for a container); the precision is that of the ONNX parsed, which the export
stage writes for fp16/bf16. Parity (`check_engine_parity`) runs the engine on CUDA through
torch-allocated buffers and compares with onnxruntime FP32 on the same images.

Neither `tensorrt` nor a GPU exists on the development machines: this path is written against
the TensorRT 10 and 11 Python APIs; the engine build and parity tests skip there with that
reason, while naming, metadata checks, profiles, the trtexec command and the builder's calls
(against fake TensorRT 10 and 11 modules) are tested everywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from neco.contract import INPUT_IMAGES, OUTPUT_FEATURES
from neco.export.config import ExportConfig, Shape, TensorRTSettings
from neco.export.errors import EngineMismatchError, ExportError, ParityError
from neco.export.tensorrt_build import build_engine, strongly_typed_opt_in
from neco.triton_config import PLAN_FILENAME

SIDECAR_SUFFIX = ".json"


class EngineMetadata(BaseModel):
    """Everything an engine is bound to; equality means "this engine may be loaded here"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    min_shape: Shape
    opt_shape: Shape
    max_shape: Shape
    precision: str
    onnx_sha256: str = ""
    """Digest of the ONNX the engine was parsed from: an engine cached under the same model name
    for other weights (a DINOv2 plan when a DINOv3 is exported) is rebuilt, never reused.
    Sidecars written before this field existed read as "" and so never match a new export."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _shape_tag(shape: Shape) -> str:
    return "x".join(str(v) for v in shape)


def engine_name(meta: EngineMetadata) -> str:
    """e.g. `neco_dinov2__NVIDIA-H100-80GB-HBM3_sm90__trt10.3.0__b1x224x224-4x448x448-8x896x896__fp16.plan`."""
    profile = "-".join(_shape_tag(s) for s in (meta.min_shape, meta.opt_shape, meta.max_shape))
    return (
        f"{meta.model_name}__{_slug(meta.gpu_name)}_sm{meta.compute_capability.replace('.', '')}"
        f"__trt{_slug(meta.tensorrt_version)}__b{profile}__{meta.precision}.plan"
    )


def expected_metadata(
    model_name: str, settings: TensorRTSettings, precision: str, device: int = 0, onnx_sha256: str = ""
) -> EngineMetadata:
    """The metadata an engine built here, now, from a `precision` ONNX would carry (needs tensorrt + CUDA)."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT engines need a CUDA GPU; torch.cuda.is_available() is False")
    major, minor = torch.cuda.get_device_capability(device)
    return EngineMetadata(
        model_name=model_name,
        gpu_name=torch.cuda.get_device_name(device),
        compute_capability=f"{major}.{minor}",
        tensorrt_version=trt.__version__,
        min_shape=settings.min_shape,
        opt_shape=settings.opt_shape,
        max_shape=settings.max_shape,
        precision=precision,
        onnx_sha256=onnx_sha256,
    )


def read_sidecar(engine_path: Path) -> EngineMetadata:
    """Metadata written next to an engine; absent or malformed metadata is a mismatch."""
    sidecar = engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        raise EngineMismatchError(
            f"{engine_path}: no metadata sidecar {sidecar.name}; refusing an engine of unknown origin"
        )
    try:
        return EngineMetadata.model_validate_json(sidecar.read_text())
    except ValueError as exc:
        raise EngineMismatchError(f"{sidecar}: malformed engine metadata ({exc})") from None


def verify_engine(engine_path: Path, expected: EngineMetadata, *, check_name: bool = True) -> None:
    """Refuse an engine whose name or sidecar differs from what this GPU/TensorRT/profile needs."""
    if not engine_path.is_file():
        raise EngineMismatchError(f"engine {engine_path} does not exist")
    if check_name and engine_path.name != engine_name(expected):
        raise EngineMismatchError(f"engine file {engine_path.name!r} is not {engine_name(expected)!r}")
    found = read_sidecar(engine_path)
    if found != expected:
        diffs = [
            f"{key}: engine {getattr(found, key)!r} != here {getattr(expected, key)!r}"
            for key in EngineMetadata.model_fields
            if getattr(found, key) != getattr(expected, key)
        ]
        raise EngineMismatchError(f"{engine_path.name} was built for another setup: " + "; ".join(diffs))


def write_sidecar(engine_path: Path, meta: EngineMetadata) -> Path:
    sidecar = engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)
    sidecar.write_text(meta.model_dump_json(indent=2))
    return sidecar


def load_engine(engine_path: Path, expected: EngineMetadata):
    """Deserialize an engine after `verify_engine`; never loads a mismatched engine."""
    import tensorrt as trt

    verify_engine(engine_path, expected)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineMismatchError(f"TensorRT could not deserialize {engine_path}")
    return engine


def engine_features(engine) -> Any:
    """A FeatureFn running the engine on CUDA (torch buffers, one stream) -> normalised features."""
    import tensorrt as trt
    import torch

    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}

    def run(images):
        stream = torch.cuda.current_stream()
        source = torch.from_numpy(images).cuda()
        context.set_input_shape(INPUT_IMAGES, tuple(source.shape))
        context.set_tensor_address(INPUT_IMAGES, source.data_ptr())
        buffers = {}
        for name in outputs:
            dtype = dtypes.get(engine.get_tensor_dtype(name))
            if dtype is None:
                raise ExportError(f"engine output {name} has type {engine.get_tensor_dtype(name)}, not FP32/FP16/BF16")
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return buffers[OUTPUT_FEATURES].float().cpu().numpy()

    return run


def check_engine_parity(
    engine,
    reference_session,
    sizes: Sequence,
    batch_sizes: Sequence[int],
    *,
    atol: float | None,
    min_cosine: float | None,
    seed: int = 0,
    patch_size: int,
) -> dict:
    """Engine vs onnxruntime FP32 on the same generated images.

    FP32 engines must match within `atol` (max abs); FP16/BF16 engines are judged by mean
    per-patch cosine like the reduced-precision ONNX graphs. Raises ParityError otherwise.
    """
    from neco.export.parity import compare, ort_features, shape_grid

    report = compare(
        engine_features(engine),
        ort_features(reference_session),
        shape_grid(sizes, batch_sizes),
        seed=seed,
        patch_size=patch_size,
        names=("tensorrt", "onnxruntime-fp32"),
    )
    if atol is not None and report.max_abs_diff > atol:
        raise ParityError(f"TensorRT engine differs from onnxruntime by {report.max_abs_diff:.3e} > {atol}")
    if min_cosine is not None and report.min_mean_cosine < min_cosine:
        raise ParityError(f"TensorRT engine mean cosine {report.min_mean_cosine:.4f} < {min_cosine} to onnxruntime")
    return report.to_dict()


def require_tensorrt() -> None:
    """Fail fast (before minutes of export work) where engines cannot be built."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ExportError(
            "backend tensorrt needs the `tensorrt` Python package: install the `tensorrt` extra (README.md, Install)"
        ) from exc
    strongly_typed_opt_in(tensorrt.__version__)  # refuses versions this code is not written for
    import torch

    if not torch.cuda.is_available():
        raise ExportError("backend tensorrt needs a CUDA GPU; torch.cuda.is_available() is False")


def build_and_check_engine(
    onnx_path: Path, reference_session, cfg: ExportConfig, work: Path, *, patch_size: int
) -> tuple[dict[str, Path], dict]:
    """Pipeline step: build (or reuse a verified cached) engine and check its parity.

    Returns the files for the version directory (`model.plan` and its metadata sidecar, which
    `verify_repository_engine` checks before anything serves it) and a report.
    """
    from neco.model.artefact import file_sha256

    require_tensorrt()
    settings = cfg.tensorrt
    meta = expected_metadata(cfg.model_name, settings, cfg.precision, onnx_sha256=file_sha256(onnx_path))
    engine_path = Path(settings.engine_cache_dir or work) / engine_name(meta)
    try:
        verify_engine(engine_path, meta)
        reused = True
    except EngineMismatchError:
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        build_engine(onnx_path, engine_path, settings, meta.precision)
        write_sidecar(engine_path, meta)
        reused = False
    parity = None
    if cfg.parity.enabled:
        reduced = meta.precision != "fp32"
        parity = check_engine_parity(
            load_engine(engine_path, meta),
            reference_session,
            [s for s in cfg.parity.sizes if _within(settings, s)],
            [b for b in cfg.parity.batch_sizes if settings.min_shape[0] <= b <= settings.max_shape[0]],
            atol=None if reduced else cfg.parity.atol,
            min_cosine=cfg.parity.min_cosine_fp16 if reduced else None,
            seed=cfg.parity.seed,
            patch_size=patch_size,
        )
    plan = work / PLAN_FILENAME
    plan.write_bytes(engine_path.read_bytes())
    sidecar = write_sidecar(plan, meta)
    report = {
        "engine_name": engine_path.name,
        "metadata": json.loads(meta.model_dump_json()),
        "reused": reused,
        "parity_vs_onnxruntime": parity,
        "precision": meta.precision,
        "onnx_parsed": onnx_path.name,
        "strongly_typed": True,
    }
    return {PLAN_FILENAME: plan, sidecar.name: sidecar}, report


def verify_repository_engine(model_dir: Path, version: int = 1, device: int = 0) -> EngineMetadata:
    """Check that `<model_dir>/<version>/model.plan` was built for this GPU and TensorRT."""
    plan = Path(model_dir) / str(version) / PLAN_FILENAME
    found = read_sidecar(plan)
    settings = TensorRTSettings(min_shape=found.min_shape, opt_shape=found.opt_shape, max_shape=found.max_shape)
    expected = expected_metadata(found.model_name, settings, found.precision, device, found.onnx_sha256)
    verify_engine(plan, expected, check_name=False)
    return expected


def _within(settings: TensorRTSettings, size) -> bool:
    (_, min_h, min_w), (_, max_h, max_w) = settings.min_shape, settings.max_shape
    return min_h <= size[0] <= max_h and min_w <= size[1] <= max_w
