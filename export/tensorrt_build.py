"""Strongly typed TensorRT engine builds: the Python builder and the equivalent trtexec command.

Every engine is strongly typed: each tensor keeps the type the ONNX gives it, so precision is
chosen by *which ONNX* is parsed (the FP32 export, or the FP16/BF16 graph from
`neco.export.precision`), never by a builder flag. This is also what keeps FP16 ViT engines
correct: a weakly typed FP16 build may run LayerNorm or softmax in FP16 where the graph
wants FP32.

TensorRT 10 and 11 differ for this code in one respect only, decided by `strongly_typed_opt_in`:
10 needs the STRONGLY_TYPED network flag (`--stronglyTyped` for trtexec); 11 is always strongly
typed and has no precision flags at all (BuilderFlag.FP16/BF16 and trtexec --fp16/--bf16 are
removed). Nothing here touches a precision BuilderFlag on either version.

The builder is driven through the `trt` module passed in (the real `tensorrt` by default), so
tests can check the calls a build makes with a fake module of either version's members.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from neco.contract import INPUT_IMAGES
from neco.export.config import Shape, TensorRTSettings, validate_profile
from neco.export.errors import ExportError

SUPPORTED_MAJORS = (10, 11)
"""TensorRT major versions this code is written for (the `tensorrt` extra's range)."""


def tensorrt_major(version: str) -> int:
    """Major version of a TensorRT version string ("10.3.0", "11.4.0.106", "11")."""
    head = str(version).strip().split(".")[0]
    if not head.isdigit():
        raise ExportError(f"cannot read a TensorRT version from {version!r}")
    return int(head)


def strongly_typed_opt_in(version: str) -> bool:
    """True where strong typing must be asked for (TensorRT 10), False where it is the only mode (11).

    The one place that knows how TensorRT versions differ; unsupported versions fail here,
    before any builder call.
    """
    major = tensorrt_major(version)
    if major not in SUPPORTED_MAJORS:
        raise ExportError(
            f"TensorRT {version} is not supported: this code is written for TensorRT "
            f"{SUPPORTED_MAJORS[0]}.x-{SUPPORTED_MAJORS[-1]}.x (strongly typed builds)"
        )
    return major == 10


def network_flags(trt: ModuleType) -> int:
    """`create_network` flags: STRONGLY_TYPED on TensorRT 10; none on 11 (the flag is deprecated, ignored)."""
    if strongly_typed_opt_in(trt.__version__):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def input_shape(shape: Shape) -> tuple[int, int, int, int]:
    """(batch, height, width) profile point -> the NHWC shape of the UINT8 image input."""
    batch, height, width = shape
    return (batch, height, width, 3)


def trtexec_command(
    onnx_path: Path, engine_path: Path, settings: TensorRTSettings, tensorrt_version: str, trtexec: str = "trtexec"
) -> list[str]:
    """The trtexec build for the container whose TensorRT is `tensorrt_version`.

    Strongly typed like `build_engine`: `onnx_path` must already hold the wanted precision.
    """
    validate_profile(settings.min_shape, settings.opt_shape, settings.max_shape)

    def shapes(shape: Shape) -> str:
        return f"{INPUT_IMAGES}:" + "x".join(str(v) for v in input_shape(shape))

    command = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={shapes(settings.min_shape)}",
        f"--optShapes={shapes(settings.opt_shape)}",
        f"--maxShapes={shapes(settings.max_shape)}",
        f"--memPoolSize=workspace:{int(settings.workspace_gib * 1024)}",
        "--skipInference",
    ]
    command += ["--stronglyTyped"] if strongly_typed_opt_in(tensorrt_version) else []
    if settings.timing_cache is not None:
        command.append(f"--timingCacheFile={settings.timing_cache}")
    return command


def build_engine(
    onnx_path: Path, engine_path: Path, settings: TensorRTSettings, precision: str, trt: ModuleType | None = None
) -> Path:
    """Parse the ONNX into a strongly typed network, set one profile, build and serialize.

    `precision` must be that of `onnx_path`'s weights: a strongly typed engine computes in
    the ONNX's types, so a mismatch would only mislabel the engine.
    """
    from neco.export.precision import onnx_precision

    if trt is None:
        import tensorrt as trt
    flags = network_flags(trt)  # version check first: nothing is built on an unsupported TensorRT
    found = onnx_precision(onnx_path)
    if found != precision:
        raise ExportError(f"{onnx_path} holds {found} weights, not {precision}: parse the {precision} ONNX")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    profile.set_shape(
        INPUT_IMAGES,
        input_shape(settings.min_shape),
        input_shape(settings.opt_shape),
        input_shape(settings.max_shape),
    )
    config.add_optimization_profile(profile)
    cache_path = settings.timing_cache
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    engine_path.write_bytes(memoryview(serialized))
    return engine_path
