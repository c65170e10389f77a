"""FP16, BF16 and INT8 conversions of the fixture's ONNX: interface unchanged, cosine parity to FP32.

The fixture's LayerScale gammas are non-trivial (see `random_backbone`), so the blocks that
get quantised really shape the features; measured here: FP16 ~0.99999, INT8 dynamic ~0.9986.
The TensorRT graphs (FP16/BF16 with LayerNorm, softmax and the L2 norm in FP32) are checked
for their tensor types, since a strongly typed engine computes in exactly those.
"""

import numpy as np
import onnx
import pytest

from neco.contract import INPUT_IMAGES
from neco.export.config import QuantizationSettings
from neco.export.errors import ExportError
from neco.export.parity import compare, ort_features, ort_session
from neco.export.precision import (
    TENSORRT_FP32_OPS,
    ImageCalibrationReader,
    convert_fp16,
    convert_int8,
    onnx_precision,
    reduced_precision_onnx,
    split_matmuls,
)

GRID = [(1, (224, 224)), (2, (308, 196))]
PATCH = 14  # the fixture model is DINOv2 (vit_small_patch14_reg4_dinov2)


@pytest.fixture(scope="module")
def fp32(model_repository_model_dir):
    path = model_repository_model_dir / "1" / "model.onnx"
    return path, ort_session(path)


def _interface(path):
    return _interface_of(onnx.load(str(path)))


def _interface_of(model):
    elem = lambda v: v.type.tensor_type.elem_type  # noqa: E731
    return [(i.name, elem(i)) for i in model.graph.input], [(o.name, elem(o)) for o in model.graph.output]


def test_fp16_keeps_uint8_in_fp32_out_and_cosine_parity(fp32, tmp_path):
    source, reference = fp32
    converted = convert_fp16(source, tmp_path / "fp16.onnx")
    assert _interface(converted) == _interface(source)
    weights = onnx.load(str(converted)).graph.initializer
    assert sum(w.data_type == onnx.TensorProto.FLOAT16 for w in weights) > 50  # really converted
    # onnxruntime's CPU provider runs this FP16 graph, so parity is measured here (no GPU needed).
    report = compare(ort_features(ort_session(converted)), ort_features(reference), GRID, patch_size=PATCH)
    assert report.min_mean_cosine >= 0.99
    assert report.max_abs_diff > 0  # not the FP32 graph in disguise


FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


def _tensor_types(model):
    """Element type of every named tensor: initializers, graph I/O, inferred values."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    types |= {v.name: v.type.tensor_type.elem_type for v in inferred.graph.output}
    return types | {init.name: init.data_type for init in model.graph.initializer}


def _weights_of(model, op_type):
    initializers = {init.name: init for init in model.graph.initializer}
    return [initializers[i] for n in model.graph.node if n.op_type == op_type for i in n.input if i in initializers]


@pytest.mark.parametrize("precision,reduced", [("fp16", FLOAT16), ("bf16", BFLOAT16)])
def test_tensorrt_graph_is_reduced_with_fp32_layernorm_softmax_and_norm(fp32, tmp_path, precision, reduced):
    source, _ = fp32
    path = reduced_precision_onnx(source, tmp_path / f"{precision}.onnx", precision, TENSORRT_FP32_OPS)
    model = onnx.load(str(path))
    assert _interface_of(model) == _interface(source) and onnx_precision(path) == precision
    types = _tensor_types(model)
    matmul_weights = _weights_of(model, "MatMul")
    assert len(matmul_weights) == 48 and {w.data_type for w in matmul_weights} == {reduced}  # qkv, proj, fc1, fc2
    kept = [n for n in model.graph.node if n.op_type in TENSORRT_FP32_OPS]
    assert {n.op_type for n in kept} == set(TENSORRT_FP32_OPS) - {"Sin", "Cos"}  # DINOv2 has no RoPE
    assert len(kept) == 25 + 12 + 1
    for node in kept:  # float inputs (activations, LayerNorm's scale/bias) and outputs all FP32; axes stay INT64
        floats = {types[name] for name in (*node.input, *node.output) if name} - {onnx.TensorProto.INT64}
        assert floats == {FLOAT}, node.name
    assert all(w.data_type == FLOAT for w in _weights_of(model, "LayerNormalization"))
    other = {BFLOAT16: FLOAT16, FLOAT16: BFLOAT16}[reduced]
    assert other not in set(types.values())  # one reduced type only
    attention = [
        n for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & {w.name for w in matmul_weights}
    ]
    assert len(attention) == 24 and all(types[n.output[0]] == reduced for n in attention)


def test_tensorrt_fp16_graph_keeps_cosine_parity(fp32, tmp_path):
    source, reference = fp32
    path = reduced_precision_onnx(source, tmp_path / "fp16.onnx", "fp16", TENSORRT_FP32_OPS)
    report = compare(ort_features(ort_session(path)), ort_features(reference), GRID, patch_size=PATCH)
    assert report.min_mean_cosine >= 0.99 and report.max_abs_diff > 0


def _bf16_as_fp32(model):
    """Independent decoding of the BF16 graph: weights widened bit-wise, every BF16 tensor made FP32."""
    for init in model.graph.initializer:
        if init.data_type == BFLOAT16:
            bits = np.frombuffer(init.raw_data, dtype=np.uint16).astype(np.uint32) << 16
            init.CopyFrom(onnx.numpy_helper.from_array(bits.view(np.float32).reshape(tuple(init.dims)), init.name))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == BFLOAT16:
                attribute.i = FLOAT
    for value in model.graph.value_info:
        if value.type.tensor_type.elem_type == BFLOAT16:
            value.type.tensor_type.elem_type = FLOAT
    return model


def test_tensorrt_bf16_weights_are_the_fp32_weights_rounded(fp32, tmp_path):
    """onnxruntime cannot run BF16 here; decoding the weights in the test checks their encoding."""
    source, reference = fp32
    path = reduced_precision_onnx(source, tmp_path / "bf16.onnx", "bf16", TENSORRT_FP32_OPS)
    original = {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(str(source)).graph.initializer}
    decoded = _bf16_as_fp32(onnx.load(str(path)))
    for init in decoded.graph.initializer:
        if init.name in original and original[init.name].dtype == np.float32:
            values = onnx.numpy_helper.to_array(init)
            np.testing.assert_allclose(values, original[init.name], rtol=2**-8, atol=0)  # bf16: 8 significant bits
    onnx.save(decoded, str(tmp_path / "decoded.onnx"))
    report = compare(
        ort_features(ort_session(tmp_path / "decoded.onnx")), ort_features(reference), GRID, patch_size=PATCH
    )
    assert report.min_mean_cosine >= 0.99 and report.max_abs_diff > 0


def test_onnx_precision_and_bad_requests(fp32, tmp_path):
    source, _ = fp32
    assert onnx_precision(source) == "fp32"
    with pytest.raises(ExportError, match="no reduced-precision ONNX for precision 'int8'"):
        reduced_precision_onnx(source, tmp_path / "x.onnx", "int8", TENSORRT_FP32_OPS)


def test_int8_quantises_matmuls_and_keeps_cosine_parity(fp32, tmp_path):
    """Dynamic mode (the default)."""
    source, reference = fp32
    converted = convert_int8(source, tmp_path / "int8.onnx", QuantizationSettings(mode="dynamic"))
    assert _interface(converted) == _interface(source)
    ops = [n.op_type for n in onnx.load(str(converted)).graph.node]
    assert ops.count("MatMulInteger") >= 48  # qkv, proj, fc1, fc2 of 12 blocks
    report = compare(ort_features(ort_session(converted)), ort_features(reference), GRID, patch_size=PATCH)
    assert report.min_mean_cosine >= 0.98
    assert report.max_abs_diff > 0


def test_int8_static_quantises_weight_matmuls_with_uint8_activations(fp32, tmp_path):
    """Static QDQ: the 48 weight MatMuls get Q/DQ pairs with UINT8 activations (U8S8, the fast
    kernel on AVX2); the attention MatMuls (two activations) stay FP32 so onnxruntime does not
    fuse a QLinearSoftmax."""
    source, reference = fp32
    settings = QuantizationSettings(mode="static", calibration_images=2, calibration_size=(112, 84))
    converted = onnx.load(str(convert_int8(source, tmp_path / "int8_static.onnx", settings)))
    assert _interface_of(converted) == _interface(source)
    producer = {out: node for node in converted.graph.node for out in node.output}
    initializers = {init.name: init for init in converted.graph.initializer}
    weights, attention = split_matmuls(onnx.load(str(source)))
    assert len(weights) == 48 and len(attention) == 24  # 12 blocks: qkv, proj, fc1, fc2 | q@k, attn@v
    by_name = {node.name: node for node in converted.graph.node}
    for name in weights:
        dequantized = [producer[i] for i in by_name[name].input if i in producer]
        assert [n.op_type for n in dequantized] == ["DequantizeLinear"] * 2, name
        activation_zero_point = initializers[producer[dequantized[0].input[0]].input[2]]
        assert activation_zero_point.data_type == onnx.TensorProto.UINT8, name
    for name in attention:
        assert all(producer[i].op_type != "DequantizeLinear" for i in by_name[name].input if i in producer), name
    report = compare(
        ort_features(ort_session(tmp_path / "int8_static.onnx")), ort_features(reference), GRID, patch_size=PATCH
    )
    assert report.min_mean_cosine >= 0.98
    assert report.max_abs_diff > 0


def test_calibration_reader_reads_user_images_resized(tmp_path):
    from PIL import Image

    for i, size in enumerate([(50, 40), (300, 200), (224, 224)]):
        Image.fromarray(np.full((size[1], size[0], 3), i * 60, np.uint8)).save(tmp_path / f"{i}.png")
    reader = ImageCalibrationReader(
        QuantizationSettings(calibration_dir=tmp_path, calibration_images=2, calibration_size=(112, 84))
    )
    batches = [reader.get_next() for _ in range(3)]
    assert [b[INPUT_IMAGES].shape for b in batches[:2]] == [(1, 112, 84, 3)] * 2
    assert batches[0][INPUT_IMAGES].dtype == np.uint8 and batches[2] is None


def test_calibration_dir_without_images_is_an_error(tmp_path):
    from neco.export.errors import ExportError

    reader = ImageCalibrationReader(QuantizationSettings(calibration_dir=tmp_path))
    with pytest.raises(ExportError, match="holds no .png/.jpg images"):
        reader.get_next()
