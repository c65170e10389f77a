"""Reduced-precision ONNX: FP16/BF16 for GPU serving, INT8 for CPU serving.

All keep the served interface unchanged (UINT8 images in, FP32 features out), so Triton
configs, PyTriton bindings and clients do not care which precision a repository holds.

- FP16 uses onnxruntime's transformer float16 converter with `keep_io_types=True`: inputs
  stay UINT8, outputs are cast back to FP32. For onnxruntime everything in between (the
  normalisation: 0..255 are exact in FP16, and the position-embedding Resize, which
  onnxruntime's CPU provider also runs in FP16) is half precision.
- For TensorRT the graph *is* the precision: engines are built strongly typed, so the ONNX
  decides every tensor's type. `TENSORRT_FP32_OPS` (LayerNorm, softmax, the L2 norm of the
  features) stay FP32 there: the converter blocks them, which inserts Casts around them.
  The converter leaves such a graph unsorted for onnx.checker and their weights as FP16
  behind a Cast; `_fold_weight_casts` restores those weights as FP32 initializers from the
  source graph and `_topological_sort` reorders the nodes.
- BF16 is that FP16 graph retyped to bfloat16, with every BF16 weight rounded from the FP32
  source (not from its FP16 copy). The patch-embedding Conv stays FP32: ONNX's Conv has no
  bfloat16 type before opset 22. onnxruntime has no BF16 CPU kernels for this graph, so a
  BF16 ONNX is only checked as an engine (TensorRT against onnxruntime FP32).
- INT8 uses onnxruntime.quantization: "dynamic" (weights INT8, activations quantised per call,
  no calibration needed) or "static" (QDQ with activation ranges calibrated on images).
  Static mode quantises only the weight MatMuls (qkv, proj, fc1, fc2), with UINT8 activations
  and per-channel INT8 weights. Both choices are measured on this project's AVX2 CPUs: an
  S8S8 MatMulInteger runs at ~0.2x the speed of U8S8, and QDQ around the attention
  MatMuls fuses into QLinearSoftmax, which took ~28% of a 448² forward on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from neco.contract import INPUT_IMAGES
from neco.export.config import QuantizationSettings
from neco.export.errors import ExportError
from neco.export.parity import generated_images

REDUCED_PRECISIONS = ("fp16", "bf16")

TENSORRT_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceL2", "Sin", "Cos")
"""Ops kept FP32 in the ONNX a TensorRT engine is built from. LayerNorm's variance and the
softmax's exponentials lose most of their accuracy in FP16, and the features' sum of squares
(384+ channels) can overflow it; DINOv3's RoPE sine/cosine of angles up to 2 pi would keep
only ~3 digits. All are cheap next to the MatMuls (DINOv2 graphs have no Sin/Cos)."""

_BF16_FP32_OPS = ("Conv", "Sin", "Cos")
"""ONNX's Conv, Sin and Cos accept bfloat16 only from opset 22; the exported graphs are opset 18."""

_ELEM_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


def convert_fp16(source: Path, destination: Path, keep_fp32: Sequence[str] = ()) -> Path:
    """FP32 ONNX -> FP16 weights/activations with FP32 I/O; ops in `keep_fp32` stay FP32."""
    model = onnx.load(str(source))
    onnx.save(_to_fp16(model, _weights(model), keep_fp32), str(destination))
    onnx.checker.check_model(str(destination), full_check=True)
    return destination


def convert_bf16(source: Path, destination: Path, keep_fp32: Sequence[str] = TENSORRT_FP32_OPS) -> Path:
    """FP32 ONNX -> BF16 weights/activations with FP32 I/O (for TensorRT; see module docs)."""
    model = onnx.load(str(source))
    originals = _weights(model)
    converted = _to_fp16(model, originals, tuple(keep_fp32) + _BF16_FP32_OPS)
    _retype_fp16_as_bf16(converted, originals)
    onnx.save(converted, str(destination))
    onnx.checker.check_model(str(destination), full_check=True)
    return destination


def reduced_precision_onnx(source: Path, destination: Path, precision: str, keep_fp32: Sequence[str]) -> Path:
    """The FP16 or BF16 graph of `source` (what a strongly typed TensorRT build parses)."""
    if precision == "fp16":
        return convert_fp16(source, destination, keep_fp32)
    if precision == "bf16":
        return convert_bf16(source, destination, keep_fp32)
    raise ExportError(f"no reduced-precision ONNX for precision {precision!r}; expected one of {REDUCED_PRECISIONS}")


def onnx_precision(path: Path) -> str:
    """The graph's precision: "fp16" or "bf16" if its weights hold that type, else "fp32".

    A strongly typed TensorRT build takes its precision from exactly this, so the engine's
    label is checked against it before parsing.
    """
    model = onnx.load(str(path), load_external_data=False)
    types = {init.data_type for init in model.graph.initializer}
    found = [name for name, elem in _ELEM_TYPES.items() if elem in types]
    if len(found) > 1:
        raise ExportError(f"{path} mixes FP16 and BF16 weights; it is no precision neco exports")
    return found[0] if found else "fp32"


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The source graph's initializers by name (the converter keeps names, not values)."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _to_fp16(model: onnx.ModelProto, originals: dict[str, np.ndarray], keep_fp32: Sequence[str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32)
        )
    except Exception as exc:  # the converter raises plain Exceptions on unsupported graphs
        raise ExportError(f"FP16 conversion failed: {exc}") from exc
    _fold_weight_casts(converted.graph, originals)
    _topological_sort(converted.graph)
    return converted


def _fold_weight_casts(graph: onnx.GraphProto, originals: dict[str, np.ndarray]) -> None:
    """Cast(weight -> FLOAT) nodes become FP32 initializers holding the source's exact values."""
    initializers = {init.name for init in graph.initializer}
    nodes, folded = [], []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        weight = node.input[0] if node.op_type == "Cast" and node.input[0] in initializers else None
        if to == onnx.TensorProto.FLOAT and weight in originals and originals[weight].dtype == np.float32:
            folded.append(numpy_helper.from_array(originals[weight], node.output[0]))
        else:
            nodes.append(node)
    used = {name for node in nodes for name in node.input} | {out.name for out in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + folded)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its inputs' producers (stable: original order wins)."""
    available = {""} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                available.update(node.output)
                ordered.append(node)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted({n for node in waiting for n in node.input if n not in available})[:5]
            raise ExportError(f"converted graph has a cycle or dangling inputs: {missing}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """FP32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _retype_fp16_as_bf16(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> None:
    """Every FLOAT16 tensor, Cast target and value type of the graph becomes BFLOAT16."""
    fp16, bf16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    graph = model.graph
    for index, init in enumerate(graph.initializer):
        if init.data_type == fp16:
            values = originals.get(init.name)
            if values is None:  # converter-made constant: widen its FP16 values
                values = numpy_helper.to_array(init).astype(np.float32)
            bits = _bf16_bits(values)
            graph.initializer[index].CopyFrom(
                onnx.helper.make_tensor(init.name, bf16, list(values.shape), bits.tobytes(), raw=True)
            )
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == fp16:
                attribute.i = bf16
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == fp16:
                values = numpy_helper.to_array(attribute.t).astype(np.float32)
                attribute.t.CopyFrom(
                    onnx.helper.make_tensor(
                        attribute.t.name, bf16, list(values.shape), _bf16_bits(values).tobytes(), raw=True
                    )
                )
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == fp16:
            value.type.tensor_type.elem_type = bf16


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
