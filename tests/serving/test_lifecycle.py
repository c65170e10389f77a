"""Overload, queue timeouts, stop/restart, and a start that fails, on server instances of their own.

This server has max_batch_size 1 and a queue of 2, so a burst of concurrent requests must
overflow: the overflow is answered at once with Triton's retryable UNAVAILABLE/503, never left
hanging, and the server then serves normally again.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from neco.contract import INPUT_IMAGES, OUTPUT_FEATURES
from neco.serving import EmbeddedServer, ServeConfig, ServingError
from neco.serving.ports import CHOSEN_PORT_FLOOR, pick_free_ports
from neco.serving.supervision import likely_cause, wait_until_listening

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


def test_a_port_taken_while_starting_fails_at_once_with_tritons_own_reason(model_repository, monkeypatch):
    """Issue 31 item 2: tritonserver exits when a port is gone by the time it binds; the start says so.

    Before, PyTriton polled the health endpoint for 120 s, deleted the workspace holding the log,
    and the error said only "its log above says why". The port is taken here after the up-front
    check, as another process on the machine could.
    """
    import neco.serving.embedded as embedded

    monkeypatch.setattr(embedded, "check_ports_free", lambda host, ports: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedServer(ServeConfig(repository=model_repository, http_port=0, grpc_port=0, metrics_port=port))
        started = time.monotonic()
        with pytest.raises(ServingError) as info:
            server.start()
        elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 60, f"the failed start took {elapsed:.0f} s"
    assert message.startswith(
        f"tritonserver exited while starting: port {port} (metrics_port) was taken by another process"
    ), message
    assert "the end of tritonserver's log:" in message and "failed to start Metrics service" in message
    assert not server.is_alive() and server.process_ids() == []


def test_the_likely_cause_is_read_from_tritons_log():
    ports = {23001: "tritonserver's private gRPC port, chosen at start"}
    taken = (
        "E1205 main.cc:293] \"failed to start GRPC service: Unavailable - Socket '127.0.0.1:23001' already in use \""
    )
    assert likely_cause(taken, ports).startswith(
        "port 23001 (tritonserver's private gRPC port, chosen at start) was taken by another process"
    )
    broken = "E1205 model_lifecycle.cc:654] \"failed to load 'neco_dinov2' version 1: Internal: stub died\""
    assert likely_cause(broken, ports) == "model 'neco_dinov2' failed to load: Internal: stub died"
    assert "--verbose" in likely_cause("", ports)
    assert likely_cause("I1205 something else", ports) == "the end of its log (below) says why"


def test_waiting_for_the_ports_ends_when_the_process_exits_or_listens(tmp_path):
    listen = (
        "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)"
    )
    (port,) = pick_free_ports("127.0.0.1", 1)
    child = subprocess.Popen([sys.executable, "-c", listen, str(port)])
    try:
        assert wait_until_listening(child.pid, {port: "http"}, timeout_s=30) is None
        (other,) = pick_free_ports("127.0.0.1", 1, exclude={port})
        assert wait_until_listening(child.pid, {port: "http", other: "grpc"}, timeout_s=0.3) == (
            "tritonserver did not open grpc within 0 s"
        )
    finally:
        child.kill()
        child.wait()
    started = time.monotonic()
    assert wait_until_listening(child.pid, {port: "http"}, timeout_s=30) == "tritonserver exited while starting"
    assert time.monotonic() - started < 5


def test_chosen_ports_avoid_the_ephemeral_range_and_each_other():
    """A port every outgoing connection may take (the kernel's ephemeral range) is not chosen for port 0."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = pick_free_ports("127.0.0.1", 3)
    second = pick_free_ports("127.0.0.1", 2, exclude=first)
    assert len(set(first) | set(second)) == 5
    assert all(CHOSEN_PORT_FLOOR <= port < low for port in first + second)


def test_pytritons_exit_warning_is_dropped(model_repository, caplog):
    """A stop on purpose is no failure; unplanned exits are reported by the server itself."""
    EmbeddedServer(ServeConfig(repository=model_repository))
    with caplog.at_level(logging.WARNING, logger="pytriton.server.triton_server"):
        logging.getLogger("pytriton.server.triton_server").warning(
            "Triton Inference Server exited with failure. Please wait."
        )
        logging.getLogger("pytriton.server.triton_server").warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def test_a_chosen_port_taken_before_tritonserver_binds_it_is_chosen_anew(model_repository, monkeypatch, caplog):
    """A port chosen for tritonserver and taken meanwhile costs one restart on other ports, not the start."""
    import neco.serving.embedded as embedded

    real, private_picks = embedded.pick_free_ports, []

    def rigged(host: str, count: int, exclude=()) -> list[int]:
        ports = real(host, count, exclude)
        if count == 2:  # tritonserver's private HTTP and gRPC ports
            private_picks.append(ports)
            if len(private_picks) == 1:
                ports[1] = port  # the first choice of its gRPC port is already taken
        return ports

    monkeypatch.setattr(embedded, "pick_free_ports", rigged)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ServeConfig(repository=model_repository, http_port=0, grpc_port=0, metrics_port=0)
        with caplog.at_level(logging.WARNING, logger="neco.serving.embedded"), EmbeddedServer(cfg) as server:
            assert server.is_alive() and server.upstream_urls[1] != f"127.0.0.1:{port}"
            np.testing.assert_array_equal(grpc_infer(server, random_images(3, 1, 28, 28)).shape, (1, 2, 2, 384))
    assert len(private_picks) == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warning.startswith("tritonserver exited while starting: port ")
        and f"{port} (tritonserver's private gRPC port" in warning
    )
    assert warning.endswith("starting again on other ports")
