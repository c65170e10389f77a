"""FP16 and INT8 conversions of the fixture's ONNX: interface unchanged, cosine parity to FP32.

The fixture's LayerScale gammas are non-trivial (see `random_backbone`), so the blocks that
get quantised really shape the features; measured here: FP16 ~0.99999, INT8 dynamic ~0.9986.
"""

import numpy as np
import onnx
import pytest

from neco.contract import INPUT_IMAGES
from neco.export.config import QuantizationSettings
from neco.export.parity import compare, ort_features, ort_session
from neco.export.precision import ImageCalibrationReader, convert_fp16, convert_int8, split_matmuls

GRID = [(1, (224, 224)), (2, (308, 196))]


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
    report = compare(ort_features(ort_session(converted)), ort_features(reference), GRID)
    assert report.min_mean_cosine >= 0.99
    assert report.max_abs_diff > 0  # not the FP32 graph in disguise


def test_int8_quantises_matmuls_and_keeps_cosine_parity(fp32, tmp_path):
    """Dynamic mode (the default)."""
    source, reference = fp32
    converted = convert_int8(source, tmp_path / "int8.onnx", QuantizationSettings(mode="dynamic"))
    assert _interface(converted) == _interface(source)
    ops = [n.op_type for n in onnx.load(str(converted)).graph.node]
    assert ops.count("MatMulInteger") >= 48  # qkv, proj, fc1, fc2 of 12 blocks
    report = compare(ort_features(ort_session(converted)), ort_features(reference), GRID)
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
    report = compare(ort_features(ort_session(tmp_path / "int8_static.onnx")), ort_features(reference), GRID)
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
