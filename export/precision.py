"""Reduced-precision ONNX: FP16 for GPU serving, INT8 for CPU serving.

Both keep the served interface unchanged (UINT8 images in, FP32 features out), so Triton
configs, PyTriton bindings and clients do not care which precision a repository holds.

- FP16 uses onnxruntime's transformer float16 converter with `keep_io_types=True`: inputs
  stay UINT8, outputs are cast back to FP32. Everything in between (including the
  normalisation: 0..255 are exact in FP16, and the position-embedding Resize, which
  onnxruntime's CPU provider also runs in FP16) is half precision. Blocking ops from
  conversion leaves the converter's graph unsorted for onnx.checker, so nothing is blocked.
- INT8 uses onnxruntime.quantization: "dynamic" (weights INT8, activations quantised per call,
  no calibration needed) or "static" (QDQ with activation ranges calibrated on images).
  Static mode quantises only the weight MatMuls (qkv, proj, fc1, fc2), with UINT8 activations
  and per-channel INT8 weights. Both choices are measured on this project's AVX2 CPUs: an
  S8S8 MatMulInteger runs at ~0.2x the speed of U8S8, and QDQ around the attention
  MatMuls fuses into QLinearSoftmax, which took ~28% of a 448² forward on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from neco.contract import INPUT_IMAGES
from neco.export.config import QuantizationSettings
from neco.export.errors import ExportError
from neco.export.parity import generated_images


def convert_fp16(source: Path, destination: Path) -> Path:
    """FP32 ONNX -> FP16 weights/activations with FP32 I/O (LayerNormalization stays fused)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # the converter raises plain Exceptions on unsupported graphs
        raise ExportError(f"FP16 conversion of {source} failed: {exc}") from exc
    onnx.save(converted, str(destination))
    onnx.checker.check_model(str(destination))
    return destination


class ImageCalibrationReader:
    """onnxruntime CalibrationDataReader over user images or generated scenes (one per call)."""

    def __init__(self, settings: QuantizationSettings, seed: int = 0) -> None:
        self._images = iter(_calibration_images(settings, seed))

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        return None if image is None else {INPUT_IMAGES: image[None]}


def _calibration_images(settings: QuantizationSettings, seed: int) -> Iterator[np.ndarray]:
    height, width = settings.calibration_size
    if settings.calibration_dir is None:
        yield from generated_images(settings.calibration_images, (height, width), seed)
        return
    from PIL import Image

    paths = sorted(p for p in Path(settings.calibration_dir).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not paths:
        raise ExportError(f"quantization.calibration_dir {settings.calibration_dir} holds no .png/.jpg images")
    for path in paths[: settings.calibration_images]:
        with Image.open(path) as image:
            yield np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.uint8)


def split_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of (MatMuls with a constant operand, MatMuls of two activations)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    weights, activations = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            (weights if constants.intersection(node.input) else activations).append(node.name)
    return weights, activations


def convert_int8(source: Path, destination: Path, settings: QuantizationSettings, seed: int = 0) -> Path:
    """FP32 ONNX -> INT8 (MatMul/Conv weights; activations per `settings.mode`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.ERROR))  # the quantizer warns through the root logger
    try:
        if settings.mode == "dynamic":
            # Dynamic MatMul quantisation; the patch-embedding Conv stays FP32 (tiny, and
            # ConvInteger has no CPU kernel for every layout).
            quantize_dynamic(
                str(source), str(destination), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
            )
        else:
            _, attention = split_matmuls(onnx.load(str(source), load_external_data=False))
            quantize_static(
                str(source),
                str(destination),
                ImageCalibrationReader(settings, seed),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=attention,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
            )
    except ExportError:
        raise
    except Exception as exc:  # quantizer failures surface as assorted internal types
        raise ExportError(f"INT8 ({settings.mode}) quantisation of {source} failed: {exc}") from exc
    finally:
        root.setLevel(previous)
    onnx.checker.check_model(str(destination))
    return destination
