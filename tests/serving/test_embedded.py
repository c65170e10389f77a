"""The embedded Triton serves the exported model like the Docker Triton would.

Every check goes through tritonclient (HTTP and gRPC) against the session `triton_server`,
and compares with onnxruntime run directly on the exported file in this process.
"""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from neco.contract import INPUT_IMAGES, OUTPUT_CLS, OUTPUT_FEATURES, OUTPUTS
from neco.triton_config import contract_from_config, read_model_config

from .conftest import random_images

PARITY_ATOL = 1e-5


def infer(protocol: str, url: str, model: str, images: np.ndarray, dtype: str = "UINT8") -> dict[str, np.ndarray]:
    """One request with a fresh client (closed afterwards), returning every output."""
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput(INPUT_IMAGES, list(images.shape), dtype)
        tensor.set_data_from_numpy(images)
        result = client.infer(model, [tensor])
        return {name: result.as_numpy(name) for name in OUTPUTS}
    finally:
        client.close()


def url_of(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def test_health_ready_and_metrics_endpoints(triton_server):
    base = f"http://{triton_server.http_url}"
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{triton_server.model_name}/ready"):
        with urllib.request.urlopen(base + path, timeout=10) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert f'nv_inference_request_success{{model="{triton_server.model_name}"' in text
    assert triton_server.http_url.startswith("127.0.0.1:")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_config_matches_export(triton_server, model_repository_model_dir, protocol):
    """Same names, dtypes, dims, batching and contract parameters as the exported config.pbtxt."""
    exported = read_model_config(model_repository_model_dir)
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        served = client.get_model_config(triton_server.model_name).config
    else:
        from google.protobuf import json_format
        from tritonclient.grpc import model_config_pb2

        client = httpclient.InferenceServerClient(triton_server.http_url)
        served = json_format.ParseDict(
            client.get_model_config(triton_server.model_name),
            model_config_pb2.ModelConfig(),
            ignore_unknown_fields=True,
        )
    client.close()

    def signature(cfg):
        return [(t.name, t.data_type, list(t.dims)) for t in [*cfg.input, *cfg.output]]

    assert served.name == exported.name
    assert signature(served) == signature(exported)
    assert served.max_batch_size == exported.max_batch_size
    assert list(served.dynamic_batching.preferred_batch_size) == list(exported.dynamic_batching.preferred_batch_size)
    assert served.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert contract_from_config(served) == contract_from_config(exported) == triton_server.contract
    for key, value in exported.parameters.items():
        assert served.parameters[key].string_value == value.string_value


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch,height,width", [(1, 56, 56), (3, 42, 70)])
def test_parity_with_in_process_onnxruntime(triton_server, reference_features, protocol, batch, height, width):
    images = random_images(batch * height + width, batch, height, width)
    served = infer(protocol, url_of(triton_server, protocol), triton_server.model_name, images)
    expected = reference_features(images)
    patch = triton_server.contract.patch_size
    grid = (batch, height // patch, width // patch)
    assert served[OUTPUT_FEATURES].shape == (*grid, triton_server.contract.embed_dim)
    assert served[OUTPUT_CLS].shape == (batch, triton_server.contract.embed_dim)
    for name in OUTPUTS:
        assert served[name].dtype == np.float32
        np.testing.assert_allclose(served[name], expected[name], rtol=0, atol=PARITY_ATOL, err_msg=name)


def test_concurrent_clients_all_correct(triton_server, reference_features):
    """8 clients x 25 requests through the dynamic batcher; every answer is its own image's."""
    pool = random_images(7, 16, 28, 28)
    expected = reference_features(pool)[OUTPUT_FEATURES]

    def client_run(client_id: int) -> list[float]:
        protocol = "grpc" if client_id % 2 else "http"
        module = grpcclient if protocol == "grpc" else httpclient
        client = module.InferenceServerClient(url_of(triton_server, protocol))
        errors = []
        try:
            for k in range(25):
                index = (client_id * 25 + k) % len(pool)
                tensor = module.InferInput(INPUT_IMAGES, [1, 28, 28, 3], "UINT8")
                tensor.set_data_from_numpy(pool[index : index + 1])
                result = client.infer(triton_server.model_name, [tensor], outputs=None)
                errors.append(float(np.abs(result.as_numpy(OUTPUT_FEATURES)[0] - expected[index]).max()))
        finally:
            client.close()
        return errors

    with ThreadPoolExecutor(8) as executor:
        errors = [e for per_client in executor.map(client_run, range(8)) for e in per_client]
    assert len(errors) == 200
    assert max(errors) <= PARITY_ATOL


# case -> (images, declared dtype, expected message fragment). The gateway (neco.serving.gateway)
# refuses shapes that break the image rules (rank, channels, empty batch, patch size) and Triton's
# own config check the dtype (HTTP 400, gRPC INVALID_ARGUMENT), all before the model runs.
MALFORMED = {
    "wrong dtype": (np.zeros((1, 28, 28, 3), np.float32), "FP32", "expects 'UINT8'"),
    "wrong rank": (np.zeros((1, 28, 28), np.uint8), "UINT8", "shape must be [batch, height, width, 3] (RGB)"),
    "not RGB": (np.zeros((1, 28, 28, 4), np.uint8), "UINT8", "shape must be [batch, height, width, 3] (RGB)"),
    "H not a multiple of 14": (
        np.zeros((1, 30, 28, 3), np.uint8),
        "UINT8",
        "images: height 30 and width 28 must each be",
    ),
    "W not a multiple of 14": (
        np.zeros((2, 28, 20, 3), np.uint8),
        "UINT8",
        "images: height 28 and width 20 must each be",
    ),
    "empty batch": (np.zeros((0, 28, 28, 3), np.uint8), "UINT8", "images: empty batch (batch dimension is 0)"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_rejected_and_server_keeps_serving(triton_server, reference_features, protocol, case):
    images, dtype, message = MALFORMED[case]
    url = url_of(triton_server, protocol)
    with pytest.raises(InferenceServerException) as info:
        infer(protocol, url, triton_server.model_name, images, dtype)
    assert message in str(info.value), str(info.value)[:500]
    assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), info.value.status()
    good = random_images(3, 1, 28, 28)
    served = infer(protocol, url, triton_server.model_name, good)
    np.testing.assert_allclose(served[OUTPUT_FEATURES], reference_features(good)[OUTPUT_FEATURES], atol=PARITY_ATOL)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_requested_outputs_subset(triton_server, reference_features, protocol):
    module = httpclient if protocol == "http" else grpcclient
    images = random_images(9, 2, 28, 42)
    client = module.InferenceServerClient(url_of(triton_server, protocol))
    try:
        tensor = module.InferInput(INPUT_IMAGES, list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(triton_server.model_name, [tensor], outputs=[module.InferRequestedOutput(OUTPUT_CLS)])
    finally:
        client.close()
    assert result.as_numpy(OUTPUT_FEATURES) is None
    np.testing.assert_allclose(result.as_numpy(OUTPUT_CLS), reference_features(images)[OUTPUT_CLS], atol=PARITY_ATOL)
