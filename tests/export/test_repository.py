"""Triton model repository writer: schema round trip, contract discovery, atomic writes."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from neco.contract import INPUT_IMAGES, OUTPUT_CLS, OUTPUT_FEATURES, OUTPUT_FEATURES_RAW, ModelContract
from neco.export.config import TritonSettings
from neco.export.errors import RepositoryError
from neco.export.repository import write_model_directory
from neco.triton_config import (
    CONFIG_FILENAME,
    build_model_config,
    config_to_text,
    contract_from_config,
    read_model_config,
)

CONTRACT = ModelContract.for_arch("vit_base_patch14_reg4_dinov2", training_hash="abc123")

SETTINGS = [
    ("onnxruntime", TritonSettings()),
    (
        "onnxruntime",
        TritonSettings(instance_kind="KIND_CPU", instance_count=3, max_batch_size=1, preferred_batch_sizes=[1]),
    ),
    (
        "tensorrt",
        TritonSettings(instance_kind="KIND_GPU", gpus=[0, 1], max_batch_size=32, preferred_batch_sizes=[8, 32]),
    ),
]


@pytest.mark.parametrize("backend,settings", SETTINGS)
def test_every_generated_config_round_trips_through_tritons_schema(backend, settings):
    cfg = build_model_config("m", CONTRACT, settings, backend, {"precision": "fp16"})
    text = config_to_text(cfg)
    parsed = mc.ModelConfig()
    text_format.Parse(text, parsed)  # Triton's own schema, independent of our parser helper
    assert parsed == cfg
    assert parsed.max_batch_size == settings.max_batch_size
    assert list(parsed.dynamic_batching.preferred_batch_size) == settings.preferred_batch_sizes
    assert parsed.dynamic_batching.default_queue_policy.max_queue_size == settings.max_queue_size
    assert parsed.dynamic_batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value(settings.instance_kind)
    assert parsed.instance_group[0].count == settings.instance_count
    assert list(parsed.instance_group[0].gpus) == settings.gpus
    assert parsed.parameters["precision"].string_value == "fp16"


def test_config_declares_the_served_interface_with_dynamic_height_and_width():
    cfg = build_model_config("m", CONTRACT, TritonSettings(), "onnxruntime")
    (images,) = cfg.input
    assert (images.name, images.data_type, list(images.dims)) == (INPUT_IMAGES, mc.TYPE_UINT8, [-1, -1, 3])
    outputs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
    assert outputs == {
        OUTPUT_FEATURES: (mc.TYPE_FP32, [-1, -1, 768]),
        OUTPUT_FEATURES_RAW: (mc.TYPE_FP32, [-1, -1, 768]),
        OUTPUT_CLS: (mc.TYPE_FP32, [768]),
    }
    assert (cfg.backend, cfg.default_model_filename) == ("onnxruntime", "model.onnx")
    trt = build_model_config("m", CONTRACT, TritonSettings(), "tensorrt")
    assert (trt.backend, trt.platform, trt.default_model_filename) == ("tensorrt", "tensorrt_plan", "model.plan")


def test_contract_is_discoverable_from_the_written_config(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"onnx bytes")
    cfg = build_model_config("neco", CONTRACT, TritonSettings(), "onnxruntime")
    model_dir = write_model_directory(tmp_path / "repo", cfg, {"model.onnx": weights})
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"onnx bytes"
    read = read_model_config(model_dir)
    assert read == cfg
    assert contract_from_config(read) == CONTRACT


def test_unknown_backend_is_refused():
    with pytest.raises(RepositoryError, match="unknown Triton backend"):
        build_model_config("m", CONTRACT, TritonSettings(), "pytorch")


def test_config_without_contract_parameters_is_refused():
    with pytest.raises(ValueError, match="neco_arch"):
        contract_from_config(mc.ModelConfig(name="foreign"))


def test_malformed_or_missing_config_is_a_repository_error(tmp_path):
    with pytest.raises(RepositoryError, match="does not exist"):
        read_model_config(tmp_path)
    (tmp_path / CONFIG_FILENAME).write_text("name: 'x'\nmax_batch_size: eight\n")
    with pytest.raises(RepositoryError, match="not a valid Triton model config"):
        read_model_config(tmp_path)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_existing_model_is_kept_unless_overwrite(tmp_path):
    repo = tmp_path / "repo"
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    cfg = build_model_config("neco", CONTRACT, TritonSettings(), "onnxruntime")
    write_model_directory(repo, cfg, {"model.onnx": old})
    with pytest.raises(RepositoryError, match="already exists"):
        write_model_directory(repo, cfg, {"model.onnx": new})
    assert (repo / "neco" / "1" / "model.onnx").read_bytes() == b"old"
    write_model_directory(repo, cfg, {"model.onnx": new}, overwrite=True)
    assert (repo / "neco" / "1" / "model.onnx").read_bytes() == b"new"
    assert _leftovers(repo) == ["neco"]  # no staging or retired directories remain


def test_failure_while_writing_leaves_nothing_behind(tmp_path):
    repo = tmp_path / "repo"
    present = tmp_path / "present.onnx"
    present.write_bytes(b"x")
    cfg = build_model_config("neco", CONTRACT, TritonSettings(), "onnxruntime")
    with pytest.raises(RepositoryError, match="does not exist"):
        write_model_directory(repo, cfg, {"model.onnx": present}, model_dir_files={"report.json": tmp_path / "missing"})
    with pytest.raises(RepositoryError, match="plain name"):
        write_model_directory(repo, cfg, {"../escape.onnx": present})
    assert _leftovers(repo) == []
    assert present.exists()


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = build_model_config("neco", CONTRACT, TritonSettings(), "onnxruntime")
    with pytest.raises(RepositoryError, match="cannot create model repository"):
        write_model_directory(blocker / "repo", cfg, {})
