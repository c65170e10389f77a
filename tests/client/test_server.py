"""The client against the real embedded Triton server (random-init ViT-S/14 reg4 via ONNX)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.client import ContractError, DenseFeatures, MemoryBank, NecoClient, ServerUnavailableError
from neco.client.errors import ModelNotFoundError
from neco.client.triton import DEFAULT_URLS
from neco.contract import ModelContract
from neco.scenes import SCENE_CLASSES, generate_scene, write_scene_dataset

from .conftest import FORBIDDEN, miou

SIZE = 112  # 8x8 patches: keeps CPU inference of the ViT-S fast


@pytest.fixture(scope="module", params=["grpc", "http"])
def client(request, triton_server) -> NecoClient:
    url = triton_server.grpc_url if request.param == "grpc" else triton_server.http_url
    with NecoClient(url, protocol=request.param, model=triton_server.model_name, size=SIZE) as neco:
        yield neco


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [generate_scene(rng, size=(SIZE, SIZE), num_classes=4) for _ in range(3)]


def test_contract_comes_from_the_served_config(client: NecoClient, model_repository_model_dir: Path) -> None:
    from neco.triton_config import contract_from_config, read_model_config

    assert client.contract == contract_from_config(read_model_config(model_repository_model_dir))
    assert client.contract == ModelContract.for_arch("vit_small_patch14_reg4_dinov2")


def test_features_match_onnxruntime_on_the_same_model(
    client: NecoClient, model_repository_model_dir: Path, scenes
) -> None:
    import onnxruntime as ort

    image = Image.fromarray(scenes[0][0]).resize((150, 130))  # any size: resized by the policy
    dense = client.features(image)
    assert isinstance(dense, DenseFeatures)
    assert dense.image.original_size == (130, 150) and dense.image.size == (112, 126)
    assert dense.features.shape == (8, 9, 384) and dense.features.dtype == np.float32
    session = ort.InferenceSession(
        str(model_repository_model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = session.run(["features"], {"images": dense.image.array[None]})[0][0]
    np.testing.assert_allclose(dense.features, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(dense.features, axis=-1), 1, atol=1e-4)


def test_list_requests_are_batched_per_size(client: NecoClient, scenes) -> None:
    images = [scenes[0][0], Image.fromarray(scenes[1][0]).resize((224, 112)), scenes[2][0]]
    batch = client.features(images)
    assert [d.features.shape[:2] for d in batch] == [(8, 8), (8, 16), (8, 8)]
    single = client.features(scenes[2][0])
    np.testing.assert_allclose(batch[2].features, single.features, atol=1e-4)
    stacked = np.stack(client.features([scenes[0][0], scenes[2][0]]))
    assert stacked.shape == (2, 8, 8, 384)
    protocol = client.features(np.stack([scenes[0][0], scenes[2][0]]))  # the FeatureBackend call: one batch
    assert isinstance(protocol, np.ndarray) and protocol.shape == (2, 8, 8, 384)
    np.testing.assert_allclose(protocol, stacked, atol=1e-4)


def test_self_retrieval_recovers_the_support_mask(client: NecoClient, scenes) -> None:
    """Even a random-init encoder maps a support image's patches onto themselves."""
    bank = MemoryBank.build(client, scenes, class_names=list(SCENE_CLASSES[:4]), image_size=SIZE)
    for image, mask in scenes:
        result = client.segment(image, bank)
        assert result.mask.shape == mask.shape
        assert miou(result.mask, mask) >= 0.9
    on_the_fly = client.segment(scenes[0][0], scenes)  # pairs: bank built at the images' own size
    np.testing.assert_array_equal(on_the_fly.mask, client.segment(scenes[0][0], bank).mask)


def test_unreachable_server_names_the_url(client: NecoClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but never listening: connections are refused
        url = f"127.0.0.1:{port}"
        with pytest.raises(ServerUnavailableError, match=url):
            NecoClient(url, protocol=client.protocol, timeout_s=5)


def test_unknown_model_is_reported_with_the_served_ones(client: NecoClient) -> None:
    with pytest.raises(ModelNotFoundError, match="model 'no_such_model' is not on the server"):
        NecoClient(client.url, protocol=client.protocol, model="no_such_model")


def test_config_without_contract_is_refused(client: NecoClient) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    bare = mc.ModelConfig(name="x")
    with pytest.raises(ContractError, match="contract not understood"):
        client._read_contract(bare)
    wrong_dtype = mc.ModelConfig(name="x")
    for key, value in client.contract.to_parameters().items():
        wrong_dtype.parameters[key].string_value = value
    wrong_dtype.input.add(name="images", data_type=mc.TYPE_FP32)
    with pytest.raises(ContractError, match="TYPE_UINT8"):
        client._read_contract(wrong_dtype)


def test_cli_end_to_end_without_torch(triton_server, tmp_path: Path) -> None:
    """`features`, `bank build`, `bank info` and `segment` in a process where torch cannot load."""
    root = write_scene_dataset(
        tmp_path / "data", splits={"train": 3, "val": 1}, size=(SIZE, SIZE), num_classes=4, seed=1
    )
    query = root / "val" / "images" / "0000.png"
    server = ["--url", triton_server.http_url, "--transport", "http", "--size", str(SIZE)]
    commands = [
        ["features", str(query), "--out", str(tmp_path / "f.npy"), "--pca", str(tmp_path / "pca.png"), *server],
        ["bank", "build", str(root / "train"), "--out", str(tmp_path / "bank"), "--fp16", *server],
        ["bank", "info", str(tmp_path / "bank")],
        [
            "segment",
            str(query),
            "--bank",
            str(tmp_path / "bank"),
            "--out",
            str(tmp_path / "mask.png"),
            "--overlay",
            str(tmp_path / "overlay.png"),
            *server,
        ],
    ]
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {FORBIDDEN!r}:
                    raise ImportError(name + " is forbidden in the client")
        sys.meta_path.insert(0, Block())
        import runpy
        for argv in {commands!r}:  # exactly what `python -m neco.client ARGV` runs
            sys.argv = ["neco.client", *argv]
            try:
                runpy.run_module("neco.client", run_name="__main__", alter_sys=True)
            except SystemExit as done:
                if done.code:
                    raise
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert np.load(tmp_path / "f.npy").shape == (8, 8, 384)
    assert Image.open(tmp_path / "pca.png").size == (SIZE, SIZE)
    bank = MemoryBank.load(tmp_path / "bank")
    assert bank.dtype == "float16" and bank.class_names == list(SCENE_CLASSES[:4]) and len(bank) == 3 * 64
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (SIZE, SIZE) and mask.max() < 4
    assert Image.open(tmp_path / "overlay.png").width == SIZE
    assert "MemoryBank(192 patches" in done.stdout
    # the size policy is part of every result line: the bank's, and the query's encoder input
    assert f"input size {SIZE} (shorter side) -> {tmp_path / 'bank'}" in done.stdout
    assert f"encoder input {SIZE}x{SIZE} (size {SIZE} (shorter side))" in done.stdout


def test_cli_reports_an_unreachable_server(tmp_path: Path) -> None:
    from neco.cli import main

    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    assert DEFAULT_URLS["grpc"].endswith(":8001")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
        assert main(["features", str(image), "--out", str(tmp_path / "f.npy"), "--url", url, "--timeout", "5"]) == 2


def test_known_but_unready_model_is_reported() -> None:
    """A model that failed to load (hard to provoke on the shared server): the server's answers are stubbed."""
    from tritonclient.utils import InferenceServerException

    from neco.client.errors import ModelNotReadyError

    class LoadingServer:
        def is_server_live(self, **_):
            return True

        def is_model_ready(self, model, **_):
            return False

        def get_model_metadata(self, model, **_):
            raise InferenceServerException(f"Request for model '{model}' failed: model is loading")

    client = NecoClient.__new__(NecoClient)
    client.protocol, client.model = "http", "m"
    with pytest.raises(ModelNotReadyError, match="model 'm' on 'host:1' is not ready .*loading"):
        client._model_config(LoadingServer(), "host:1", {})
