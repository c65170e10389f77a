"""The exported ONNX (session fixture) against PyTorch, from one file at several shapes."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import normalize

from neco.contract import IMAGENET_MEAN, IMAGENET_STD, INPUT_IMAGES, OUTPUTS, ModelContract
from neco.export.parity import generated_images, mean_patch_cosine, ort_session
from neco.model import patch_features
from neco.triton_config import contract_from_config, read_model_config

# Three resolutions (two non-square) and batch sizes 1 and 3, all through the one exported file;
# the PyTorch reference dominates the cost, so not every combination is run.
SHAPES = [(3, (224, 224)), (1, (448, 336)), (3, (308, 196)), (1, (308, 196))]


@pytest.fixture(scope="module")
def onnx_path(model_repository_model_dir):
    return model_repository_model_dir / "1" / "model.onnx"


@pytest.fixture(scope="module")
def session(onnx_path):
    return ort_session(onnx_path)


def reference(backbone, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-style preprocessing (ToTensor + Normalize) and the shared feature definition."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    with torch.no_grad():
        grid, cls = patch_features(backbone, x)
    return F.normalize(grid, dim=-1).numpy(), grid.numpy(), cls.numpy()


def test_graph_passes_checker_with_contract_interface(onnx_path):
    onnx.checker.check_model(str(onnx_path), full_check=True)
    model = onnx.load(str(onnx_path))
    opset = next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
    assert opset >= 18
    (image_input,) = model.graph.input
    assert image_input.name == INPUT_IMAGES
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = image_input.type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims[:3]] == [True, True, True] and dims[3].dim_value == 3
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    ops = [n.op_type for n in model.graph.node]
    # LayerNorm must stay one node (FP16 engines overflow on the decomposed form): 12 blocks + final.
    assert ops.count("LayerNormalization") == 25
    resize = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resize and all(any(a.name == "antialias" and a.i == 1 for a in n.attribute) for n in resize)


@pytest.mark.parametrize("batch,size", SHAPES, ids=[f"b{b}-{h}x{w}" for b, (h, w) in SHAPES])
def test_onnxruntime_matches_pytorch_from_one_file(session, export_source_model, batch, size):
    images = generated_images(batch, size, seed=batch * 1000 + size[0])
    features, raw, cls = session.run(list(OUTPUTS), {INPUT_IMAGES: images})
    want_features, want_raw, want_cls = reference(export_source_model, images)
    assert features.shape == (batch, size[0] // 14, size[1] // 14, 384)
    assert features.dtype == np.float32 and cls.shape == (batch, 384)
    assert np.abs(features - want_features).max() <= 1e-3
    assert np.abs(raw - want_raw).max() <= 1e-3 * max(1.0, np.abs(want_raw).max())
    assert np.abs(cls - want_cls).max() <= 1e-3 * max(1.0, np.abs(want_cls).max())
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, atol=1e-5)


def test_batch_items_are_independent(session):
    """Dynamic batching must not mix images: item 0 of a batch equals the image alone."""
    images = generated_images(3, (224, 224), seed=7)
    batched = session.run([OUTPUTS[0]], {INPUT_IMAGES: images})[0]
    alone = session.run([OUTPUTS[0]], {INPUT_IMAGES: images[:1]})[0]
    assert mean_patch_cosine(batched[:1], alone) > 0.99999


@pytest.mark.parametrize("size", [(225, 224), (224, 230)])
def test_non_patch_multiple_input_is_rejected_by_the_graph(session, size):
    """The graph refuses sizes that are not multiples of 14 instead of cropping silently."""
    with pytest.raises(Exception, match="cannot be reshaped"):
        session.run([OUTPUTS[0]], {INPUT_IMAGES: np.zeros((1, *size, 3), dtype=np.uint8)})


def test_fixture_config_carries_the_contract(model_repository_model_dir):
    cfg = read_model_config(model_repository_model_dir)
    assert contract_from_config(cfg) == ModelContract.for_arch("vit_small_patch14_reg4_dinov2")
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU


def test_opset_23_exports_one_attention_node_per_block_with_parity(export_source_model, tmp_path):
    """`onnx.opset: 23` turns each block's scaled-dot-product attention into one `Attention`
    node (a few percent faster on onnxruntime CPU); the graph must still match PyTorch."""
    from neco.export.config import OnnxSettings
    from neco.export.onnx_export import export_onnx
    from neco.model import DenseFeatureModel

    contract = ModelContract.for_arch("vit_small_patch14_reg4_dinov2")
    path = export_onnx(
        DenseFeatureModel(export_source_model, contract),
        tmp_path / "opset23.onnx",
        OnnxSettings(simplify=False, opset=23),
    )
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Attention") == 12 and "Softmax" not in ops
    session = ort_session(path)
    for batch, size in [(1, (224, 224)), (2, (308, 196))]:
        images = generated_images(batch, size, seed=23)
        features = session.run([OUTPUTS[0]], {INPUT_IMAGES: images})[0]
        assert np.abs(features - reference(export_source_model, images)[0]).max() <= 1e-3
