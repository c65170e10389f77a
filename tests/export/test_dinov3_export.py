"""DINOv3 through export: `neco export onnx --source <artefact>`, dynamic B/H/W, TensorRT-parsable.

One random-init DINOv3-S artefact is exported once per module through the real CLI with the
shipped `configs/export_onnx.yaml` (simplified graph, the pipeline's own parity check); the
tests then hold the written graph to the issue's bars: parity with PyTorch <= 1e-4 at shapes
other than the export example (square and not), no data-dependent control flow anywhere in
the graph, the FP16/BF16/INT8 conversions and the (fake) strongly typed TensorRT build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from neco.cli import main
from neco.contract import DEFAULT_MODEL_NAME, INPUT_IMAGES, OUTPUT_FEATURES, OUTPUTS, ModelContract
from neco.export.config import QuantizationSettings
from neco.export.parity import generated_images, mean_patch_cosine, ort_session
from neco.export.precision import TENSORRT_FP32_OPS, convert_int8, onnx_precision, reduced_precision_onnx
from neco.export.tensorrt_build import build_engine
from neco.model import DenseFeatureModel, load_backbone, save_artefact
from neco.model.testing import random_backbone
from neco.triton_config import contract_from_config, read_model_config
from tests.export.test_tensorrt_build import SETTINGS, fake_tensorrt

ARCH = "vit_small_patch16_dinov3"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "export_onnx.yaml"
CONTROL_FLOW = {"If", "Loop", "Scan"}
PARITY_SHAPES = [(1, (224, 224)), (1, (448, 336)), (1, (224, 448)), (1, (112, 560)), (2, (336, 224))]
"""Export example is 224 x 224: every other size shows that the position path stayed dynamic."""


@pytest.fixture(scope="module")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dinov3_artefact")
    return save_artefact(random_backbone(ARCH, seed=0), ModelContract.for_arch(ARCH), out, {"test": "dinov3"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, artefact: Path) -> Path:
    repository = tmp_path_factory.mktemp("dinov3_repository")
    argv = ["export", "onnx", "--config", str(CONFIG), "--source", str(artefact), "--out", str(repository)]
    assert main(argv) == 0
    return repository / DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def onnx_path(model_dir: Path) -> Path:
    return model_dir / "1" / "model.onnx"


def op_types(graph: onnx.GraphProto) -> set[str]:
    """Every node type in `graph` and in the sub-graphs of its nodes' attributes."""
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attribute in node.attribute:
            for sub in (attribute.g, *attribute.graphs):
                found |= op_types(sub)
    return found


def test_cli_export_serves_the_issue_shape(model_dir: Path, onnx_path: Path) -> None:
    """uint8 [1, 224, 320, 3] -> features [1, 14, 20, 384]; the config carries the DINOv3 contract."""
    contract = contract_from_config(read_model_config(model_dir))
    assert contract == ModelContract.for_arch(ARCH).model_copy(update={"training_hash": contract.training_hash})
    assert (contract.family, contract.patch_size, contract.position) == ("dinov3", 16, "rope")
    outputs = ort_session(onnx_path).run(list(OUTPUTS), {INPUT_IMAGES: generated_images(1, (224, 320), seed=5)})
    assert [o.shape for o in outputs] == [(1, 14, 20, 384), (1, 14, 20, 384), (1, 384)]


def test_parity_with_pytorch_at_shapes_other_than_the_example(artefact: Path, onnx_path: Path) -> None:
    backbone, contract = load_backbone(artefact)
    dense = DenseFeatureModel(backbone, contract).eval()
    session = ort_session(onnx_path)
    for index, (batch, size) in enumerate(PARITY_SHAPES):
        images = generated_images(batch, size, seed=index)
        served = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {INPUT_IMAGES: images})))
        with torch.no_grad():
            reference = dict(zip(OUTPUTS, (t.numpy() for t in dense(torch.from_numpy(images)))))
        for name in OUTPUTS:
            diff = float(np.abs(served[name] - reference[name]).max())
            assert diff <= 1e-4, f"{name} at {batch}x{size}: max abs diff {diff:.2e}"


def test_graph_has_no_data_dependent_control_flow(onnx_path: Path, model_repository_model_dir: Path) -> None:
    """TensorRT's parser rejects the If/Loop that Meta's own RoPE export produces; neither family has any."""
    for path in (onnx_path, model_repository_model_dir / "1" / "model.onnx"):
        types = op_types(onnx.load(str(path), load_external_data=False).graph)
        assert not types & CONTROL_FLOW, f"{path}: control flow {sorted(types & CONTROL_FLOW)} in {sorted(types)}"
    dinov3_ops = op_types(onnx.load(str(onnx_path)).graph)
    assert {"Sin", "Cos"} <= dinov3_ops  # RoPE is computed in the graph, per input grid


def test_reduced_precisions_and_the_fake_tensorrt_build_accept_it(onnx_path: Path, tmp_path: Path) -> None:
    reference = ort_session(onnx_path)
    images = generated_images(1, (224, 320), seed=9)
    want = reference.run([OUTPUT_FEATURES], {INPUT_IMAGES: images})[0]
    fp16 = reduced_precision_onnx(onnx_path, tmp_path / "model_fp16.onnx", "fp16", ())
    got = ort_session(fp16).run([OUTPUT_FEATURES], {INPUT_IMAGES: images})[0]
    assert mean_patch_cosine(got, want) >= 0.99
    int8 = convert_int8(onnx_path, tmp_path / "model_int8.onnx", QuantizationSettings(mode="dynamic"))
    got = ort_session(int8).run([OUTPUT_FEATURES], {INPUT_IMAGES: images})[0]
    assert mean_patch_cosine(got, want) >= 0.95
    for precision in ("fp16", "bf16"):
        reduced = reduced_precision_onnx(onnx_path, tmp_path / f"trt_{precision}.onnx", precision, TENSORRT_FP32_OPS)
        onnx.checker.check_model(str(reduced))
        assert onnx_precision(reduced) == precision
        graph = onnx.load(str(reduced)).graph
        rope_inputs = {n.input[0] for n in graph.node if n.op_type in ("Sin", "Cos")}
        cast_to = {n.output[0]: n.attribute[0].i for n in graph.node if n.op_type == "Cast"}
        assert rope_inputs and all(cast_to.get(name) == onnx.TensorProto.FLOAT for name in rope_inputs)
        trt = fake_tensorrt("11.4.0.106")
        engine = build_engine(reduced, tmp_path / f"e_{precision}.plan", SETTINGS, precision, trt=trt)
        assert engine.is_file() and ("parse_from_file", str(reduced)) in trt.calls
