"""Overload, queue timeouts and stop/restart, on a server instance of its own.

This server has max_batch_size 1 and a queue of 2, so a burst of concurrent requests must
overflow: the overflow is answered at once with Triton's retryable UNAVAILABLE/503, never left
hanging, and the server then serves normally again.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from neco.contract import INPUT_IMAGES, OUTPUT_FEATURES
from neco.serving import EmbeddedServer, ServeConfig, ServingError

from .conftest import random_images

CLIENT_TIMEOUT_S = 120.0  # a hang shows up as a client timeout error, failing the test


@pytest.fixture(scope="module")
def small_server(model_repository) -> Iterator[EmbeddedServer]:
    cfg = ServeConfig(
        repository=model_repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        max_batch_size=1,
        max_queue_size=2,
        request_timeout_ms=20_000,
    )
    with EmbeddedServer(cfg) as server:
        yield server


def grpc_infer(server: EmbeddedServer, images: np.ndarray, **kwargs) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput(INPUT_IMAGES, list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(server.model_name, [tensor], client_timeout=CLIENT_TIMEOUT_S, **kwargs)
        return result.as_numpy(OUTPUT_FEATURES)
    finally:
        client.close()


def test_queue_policy_is_served(small_server):
    client = grpcclient.InferenceServerClient(small_server.grpc_url)
    config = client.get_model_config(small_server.model_name).config
    client.close()
    policy = config.dynamic_batching.default_queue_policy
    assert (config.max_batch_size, policy.max_queue_size, policy.default_timeout_microseconds) == (1, 2, 20_000_000)
    assert max(config.dynamic_batching.preferred_batch_size, default=1) == 1  # exported [4, 8] dropped


def test_overload_gets_retryable_error_not_a_hang(small_server, reference_features):
    images = random_images(11, 1, 224, 224)
    expected = reference_features(images)[OUTPUT_FEATURES]

    def one(_: int) -> str | np.ndarray:
        try:
            return grpc_infer(small_server, images)
        except InferenceServerException as exc:
            return f"{exc.status()} {exc.message()}"

    with ThreadPoolExecutor(16) as executor:
        outcomes = list(executor.map(one, range(16)))
    rejected = [o for o in outcomes if isinstance(o, str)]
    served = [o for o in outcomes if not isinstance(o, str)]
    assert rejected, "16 concurrent requests against a queue of 2 should overflow"
    assert all(r.startswith("StatusCode.UNAVAILABLE") and "Exceeds maximum queue size" in r for r in rejected), rejected
    assert served, "the requests that fit in the queue must be served"
    for features in served:
        np.testing.assert_allclose(features, expected, atol=1e-5)
    np.testing.assert_allclose(grpc_infer(small_server, images), expected, atol=1e-5)


def test_request_timeout_is_rejected(small_server):
    """A request whose queue timeout (here 1 us, a per-request override) expires is rejected."""
    with pytest.raises(InferenceServerException, match="Request timeout expired") as info:
        grpc_infer(small_server, random_images(1, 1, 28, 28), timeout=1)
    assert info.value.status() == "StatusCode.UNAVAILABLE"


def port_is_open(url: str) -> bool:
    host, port = url.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) == 0


def test_stop_and_restart(small_server):
    images = random_images(5, 1, 28, 28)
    before = grpc_infer(small_server, images)
    http_url = small_server.http_url
    small_server.stop()
    assert not small_server.is_alive()
    assert not port_is_open(http_url)
    with pytest.raises(ServingError, match="not running"):
        _ = small_server.grpc_url
    small_server.stop()  # idempotent

    small_server.start()
    assert small_server.is_alive()
    client = httpclient.InferenceServerClient(small_server.http_url)
    assert client.is_server_ready() and client.is_model_ready(small_server.model_name)
    client.close()
    np.testing.assert_array_equal(grpc_infer(small_server, images), before)
    with pytest.raises(ServingError, match="already running"):
        small_server.start()
