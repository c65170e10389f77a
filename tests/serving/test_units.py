"""Fast checks of ServeConfig, request validation, provider choice and the launcher helpers."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from neco.config import ConfigError, load_config
from neco.serving.config import ServeConfig
from neco.serving.ports import pick_free_ports
from neco.serving.pytriton_compat import ensure_stub_library_path
from neco.serving.repository import find_model_version
from neco.serving.runtime import (
    MalformedRequestError,
    ModelLoadError,
    OnnxFeatureRunner,
    resolve_providers,
    validate_images,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("serve_*.yaml")), ids=lambda p: p.name)
def test_shipped_serve_configs_validate(path):
    cfg = load_config(ServeConfig, path, ["repository=model_repository"])
    assert cfg.host == "127.0.0.1"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("http_port=70000", "http_port"),
        ("providers=[TensorrtExecutionProvider]", "unknown onnxruntime providers"),
        ("providers=[]", "must not be empty"),
        ("max_queue_size=0", "max_queue_size"),
        ("grpc_port=8000", "must differ"),
        ("preferred_batch_sizes=[2,16]", "exceed max_batch_size 8"),
        ("bogus=1", "bogus"),
    ],
)
def test_serve_config_rejects(override, fragment):
    overrides = ["repository=x", "max_batch_size=8", override]
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(ServeConfig, None, overrides)


@pytest.mark.parametrize(
    "images, fragment",
    [
        (np.zeros((1, 28, 28, 3), np.float32), "dtype must be UINT8"),
        (np.zeros((28, 28, 3), np.uint8), r"shape must be \[batch, height, width, 3\]"),
        (np.zeros((1, 28, 28, 1), np.uint8), "got \\[1, 28, 28, 1\\]"),
        (np.zeros((0, 28, 28, 3), np.uint8), "empty batch"),
        (np.zeros((1, 29, 28, 3), np.uint8), "height 29 and width 28"),
        (np.zeros((1, 0, 28, 3), np.uint8), "height 0"),
        (None, "expected a tensor"),
    ],
)
def test_validate_images_rejects(images, fragment):
    with pytest.raises(MalformedRequestError, match=fragment) as info:
        validate_images(images, 14)
    assert isinstance(info.value, ValueError)


def test_runner_batches_requests_of_mixed_sizes(model_repository_model_dir, reference_features):
    from pytriton.proxy.types import Request

    runner = OnnxFeatureRunner(model_repository_model_dir / "1" / "model.onnx", intra_op_threads=1, patch_size=14)
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(1, 28, 28, 3), (2, 28, 42, 3), (2, 28, 28, 3)]
    ]
    responses = runner([Request(data={"images": b}) for b in batches])
    assert len(responses) == 3
    for batch, response in zip(batches, responses):
        expected = reference_features(batch)
        for name, value in expected.items():
            np.testing.assert_allclose(response[name], value, atol=1e-5)


def test_runner_refuses_missing_file_and_unknown_provider(tmp_path, model_repository_model_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxFeatureRunner(tmp_path / "model.onnx", patch_size=14)
    if "CUDAExecutionProvider" not in resolve_providers(None):
        with pytest.raises(ModelLoadError, match="not available"):
            OnnxFeatureRunner(
                model_repository_model_dir / "1" / "model.onnx", providers=["CUDAExecutionProvider"], patch_size=14
            )


def test_runner_refuses_a_graph_with_other_tensors(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(ModelLoadError, match="differ from the contract"):
        OnnxFeatureRunner(tmp_path / "model.onnx", patch_size=14)


def test_stub_library_path_starts_with_interpreter_libdir(monkeypatch):
    libdir = sysconfig.get_config_var("LIBDIR")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/opt/other:{libdir}")
    assert ensure_stub_library_path() == f"{libdir}:/opt/other"
    assert ensure_stub_library_path() == f"{libdir}:/opt/other"  # idempotent
    monkeypatch.delenv("LD_LIBRARY_PATH")
    ensure_stub_library_path()
    assert os.environ["LD_LIBRARY_PATH"] == libdir


def test_free_ports_are_distinct():
    ports = pick_free_ports("127.0.0.1", 3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)


def test_model_version_lookup(tmp_path):
    for version in ("1", "3", "notes"):
        (tmp_path / version).mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"")
    (tmp_path / "3" / "model.plan").write_bytes(b"")
    assert find_model_version(tmp_path, "model.onnx") == 1
    with pytest.raises(ModelLoadError, match="backend=onnxruntime"):
        find_model_version(tmp_path, "model.bin")


def copy_model_dir(source: Path, root: Path, edit=None) -> Path:
    """A repository with `source`'s config.pbtxt (optionally edited) and no model files yet."""
    from google.protobuf import text_format

    from neco.triton_config import read_model_config

    cfg = read_model_config(source)
    if edit is not None:
        edit(cfg)
    target = root / cfg.name
    (target / "1").mkdir(parents=True)
    (target / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    return root


@pytest.mark.parametrize(
    "edit, files, error, fragment",
    [
        (None, ["model.plan"], "ModelLoadError", "backend=onnxruntime"),
        (lambda cfg: cfg.parameters.clear(), ["model.onnx"], "ValueError", "lack 'neco_arch'"),
        (lambda cfg: setattr(cfg.output[0], "data_type", 10), ["model.onnx"], "ModelLoadError", "must be TYPE_FP32"),
        (lambda cfg: setattr(cfg, "max_batch_size", 0), ["model.onnx"], "ModelLoadError", "max_batch_size"),
        (
            lambda cfg: cfg.output.add(name="attn", data_type=11, dims=[-1]),
            ["model.onnx"],
            "ModelLoadError",
            r"\['attn'\] are not part of the served contract",
        ),
    ],
    ids=["plan-only", "no-contract", "wrong-dtype", "unbatched", "extra-tensor"],
)
def test_start_refuses_unservable_repositories(tmp_path, model_repository_model_dir, edit, files, error, fragment):
    from neco.serving import EmbeddedServer, ServingError, runtime

    root = copy_model_dir(model_repository_model_dir, tmp_path, edit)
    for name in files:
        (root / "neco_dinov2" / "1" / name).write_bytes((model_repository_model_dir / "1" / "model.onnx").read_bytes())
    server = EmbeddedServer(ServeConfig(repository=root, http_port=0, grpc_port=0, metrics_port=0))
    expected = getattr(runtime, error, ValueError)
    with pytest.raises(expected, match=fragment):
        server.start()
    assert not server.is_alive()
    with pytest.raises(ServingError, match="not running"):
        _ = server.http_url


def test_runner_returns_only_requested_outputs(model_repository_model_dir, reference_features):
    from pytriton.proxy.types import Request

    runner = OnnxFeatureRunner(model_repository_model_dir / "1" / "model.onnx", intra_op_threads=1, patch_size=14)
    images = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    requests = [
        Request(data={"images": images[:1]}, requested_output_names=["cls_token"]),
        Request(data={"images": images[1:]}, requested_output_names=None),
    ]
    first, second = runner(requests)
    expected = reference_features(images)
    assert set(first) == {"cls_token"} and set(second) == {"features", "features_raw", "cls_token"}
    np.testing.assert_allclose(first["cls_token"], expected["cls_token"][:1], atol=1e-5)
    np.testing.assert_allclose(second["features"], expected["features"][1:], atol=1e-5)


def test_port_check_passes_free_ports_and_names_a_taken_one():
    import socket

    from neco.serving.ports import PortInUseError, check_ports_free

    free = pick_free_ports("127.0.0.1", 1)[0]
    check_ports_free("127.0.0.1", {"http_port": free, "grpc_port": 0})  # 0 = chosen later: not checked
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} \\(metrics_port\\) on 127.0.0.1 is in use") as info:
            check_ports_free("127.0.0.1", {"http_port": free, "metrics_port": port})
    assert info.value.exit_code == 2


def test_triton_config_carries_the_log_file_and_its_tail_is_read(tmp_path):
    from neco.serving.embedded import EmbeddedServer
    from neco.serving.supervision import log_tail

    quiet = EmbeddedServer(ServeConfig(repository=tmp_path))
    quiet._ports, quiet._upstream = (1, 2, 3), (4, 5)
    assert quiet._triton_config(uses_gpu=False, log_file=tmp_path / "t.log").log_file == tmp_path / "t.log"
    assert log_tail(tmp_path / "absent.log") == ""
    (tmp_path / "t.log").write_text("".join(f"line {i}\n" for i in range(50)))
    assert log_tail(tmp_path / "t.log", lines=2) == "line 48\nline 49"
