"""Client transport: typed errors for every transport failure, retries, several servers with failover.

The fast tests drive the real tritonclient against sockets that misbehave on purpose (refuse,
close mid-request, speak HTTP/2); the slow ones run two embedded Triton servers on loopback.
"""

from __future__ import annotations

import gc
import http.client
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from geventhttpclient.response import HTTPConnectionClosed
from PIL import Image
from tritonclient.utils import InferenceServerException

from neco.client import InferenceError, NecoClient, RetryPolicy, ServerUnavailableError
from neco.client.errors import EndpointError, ModelNotReadyError, ServerOverloadedError
from neco.client.transport import Endpoints, call_with_retries, parse_urls, translate

SIZE = 112


# --- policy, URLs, error translation ---------------------------------------------------------
def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2, jitter=0.2)
    rng = random.Random(0)
    for round_, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        waits = [policy.backoff_s(round_, rng) for _ in range(200)]
        assert base * 0.8 <= min(waits) and max(waits) <= base
    assert RetryPolicy.off().attempts == 1
    with pytest.raises(ValueError, match="max_backoff_s"):
        RetryPolicy(initial_backoff_s=3, max_backoff_s=1)
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_urls_lists_and_dns_names() -> None:
    assert parse_urls("a:1, b:2,a:1") == ["a:1", "b:2"]
    assert parse_urls(["a:1", "b:2"]) == ["a:1", "b:2"]

    def resolver(host, port, type):  # noqa: A002 (getaddrinfo's keyword)
        assert (host, port, type) == ("triton-headless", 8001, socket.SOCK_STREAM)
        return [(0, 0, 0, "", ("10.0.0.1", port)), (0, 0, 0, "", ("10.0.0.2", port)), (0, 0, 0, "", ("fd00::3", port))]

    assert parse_urls("dns:///triton-headless:8001", resolve=resolver) == [
        "10.0.0.1:8001",
        "10.0.0.2:8001",
        "[fd00::3]:8001",
    ]
    assert "127.0.0.1:8001" in parse_urls("dns:///localhost:8001")
    with pytest.raises(ServerUnavailableError, match="does not resolve"):
        parse_urls("dns:///no-such-host.invalid:8001")
    for bad in ("http://localhost:8000", "grpc://h:1", "localhost", "h:port", "h:0", "", "a:1,,b:2"):
        with pytest.raises(EndpointError):
            parse_urls(bad)


@pytest.mark.parametrize(
    ("raised", "expected", "retryable"),
    [
        (HTTPConnectionClosed("connection closed."), ServerUnavailableError, True),
        (ConnectionRefusedError(111, "Connection refused"), ServerUnavailableError, True),
        (ConnectionResetError(104, "Connection reset by peer"), ServerUnavailableError, True),
        (http.client.HTTPException("bad status line"), ServerUnavailableError, False),
        (TimeoutError(), ServerUnavailableError, False),
        (InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE"), ServerUnavailableError, True),
        (
            InferenceServerException("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE"),
            ServerOverloadedError,
            True,
        ),
        (InferenceServerException("Exceeds maximum queue size", status="503"), ServerOverloadedError, True),
        (InferenceServerException("too many", status="StatusCode.RESOURCE_EXHAUSTED"), ServerOverloadedError, True),
        (InferenceServerException("bad shape", status="400"), InferenceError, False),
        (InferenceServerException("late", status="StatusCode.DEADLINE_EXCEEDED"), InferenceError, False),
        (
            InferenceServerException("Request for unknown model: 'm' has no available versions"),
            ModelNotReadyError,
            True,
        ),
        (KeyError("x"), InferenceError, False),
    ],
)
def test_every_transport_exception_becomes_a_typed_error(raised, expected, retryable) -> None:
    error = translate(raised, "h:1", "http", "inference")
    assert type(error) is expected and error.retryable is retryable
    assert "h:1" in str(error)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _run(outcomes: dict[str, list], policy: RetryPolicy, urls=("a:1", "b:1"), timeout_s=10.0, endpoints=None):
    """call_with_retries over fake servers; `outcomes[url]` pops an exception (raised) or a value."""
    clock = FakeClock()
    tried: list[str] = []

    def attempt(url: str, seconds_left: float):
        tried.append(url)
        clock.now += 0.01
        outcome = outcomes[url].pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    endpoints = endpoints or Endpoints(urls, cooldown_s=1.0, clock=clock)
    try:
        result = call_with_retries(attempt, endpoints, policy, timeout_s, random.Random(0), clock.sleep, clock)
    except Exception as exc:
        result = exc
    return result, tried, clock.sleeps


def down(url: str = "a:1") -> ServerUnavailableError:
    return ServerUnavailableError(url, "connection refused")


def test_failover_is_immediate_and_backoff_follows_a_full_round() -> None:
    policy = RetryPolicy(attempts=5, initial_backoff_s=0.1, max_backoff_s=1, jitter=0)
    result, tried, sleeps = _run({"a:1": [down(), down()], "b:1": [down("b:1"), "ok"]}, policy)
    assert result == "ok" and tried == ["a:1", "b:1", "a:1", "b:1"] and sleeps == [0.1]


def test_retries_off_non_retryable_and_deadline() -> None:
    result, tried, _ = _run({"a:1": [down()], "b:1": ["ok"]}, RetryPolicy.off())
    assert isinstance(result, ServerUnavailableError) and tried == ["a:1"] and "gave up" not in str(result)
    bad = InferenceError("bad shape")
    result, tried, _ = _run({"a:1": [bad], "b:1": ["ok"]}, RetryPolicy(attempts=5))
    assert result is bad and tried == ["a:1"]
    policy = RetryPolicy(attempts=100, initial_backoff_s=1, max_backoff_s=4, jitter=0)
    result, tried, sleeps = _run({"a:1": [down()] * 100}, policy, urls=("a:1",), timeout_s=10)
    assert isinstance(result, ServerUnavailableError) and "gave up after 4 attempts on 1 server" in str(result)
    assert sleeps == [1, 2, 4]  # the next wait (4 s) would end past the 10 s deadline


def test_round_robin_skips_a_failed_server_until_its_cooldown_ends() -> None:
    clock = FakeClock()
    endpoints = Endpoints(["a:1", "b:1", "c:1"], cooldown_s=1.0, clock=clock)
    assert [endpoints.order()[0] for _ in range(4)] == ["a:1", "b:1", "c:1", "a:1"]
    endpoints.failed("b:1")
    assert endpoints.order() == ["c:1", "a:1", "b:1"]  # b's turn: it goes last
    clock.now = 2.0
    assert endpoints.order() == ["c:1", "a:1", "b:1"]
    assert endpoints.order() == ["a:1", "b:1", "c:1"]


# --- real tritonclient against misbehaving sockets --------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_connection_refused_is_typed_and_quick(protocol: str) -> None:
    urls = [f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{_closed_port()}"]
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=r"gave up after 4 attempts on 2 servers") as caught:
        NecoClient(urls, protocol=protocol, timeout_s=10, retry=RetryPolicy(initial_backoff_s=0.05))
    assert time.monotonic() - start < 3
    assert caught.value.url in urls


@pytest.fixture
def hangup_server() -> Iterator[tuple[str, list[int]]]:
    """A TCP server that reads a request and closes the connection without answering."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.recv(65536)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()


def test_connection_closed_mid_request_is_typed_and_retried(hangup_server) -> None:
    url, accepted = hangup_server
    with pytest.raises(ServerUnavailableError, match="closed the connection") as caught:
        NecoClient(url, protocol="http", timeout_s=10, retry=RetryPolicy.off())
    assert caught.value.retryable and not isinstance(caught.value, HTTPConnectionClosed)
    before = len(accepted)
    with pytest.raises(ServerUnavailableError, match="gave up after 3 attempts"):
        NecoClient(url, protocol="http", timeout_s=10, retry=RetryPolicy(attempts=3, initial_backoff_s=0.01))
    assert len(accepted) - before >= 3  # every attempt reached the server


def test_half_built_http_client_prints_nothing_on_collection(monkeypatch) -> None:
    from neco.client.triton import _http_client

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(InferenceServerException):
        _http_client("http://localhost:1", 5.0)  # tritonclient refuses the scheme inside __init__
    gc.collect()
    assert unraisable == []


@pytest.fixture
def grpc_port() -> Iterator[str]:
    """A bare gRPC (HTTP/2) server: what `--transport http` meets on Triton's gRPC port."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _cli(tmp_path: Path, *server: str) -> subprocess.CompletedProcess:
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    argv = ["features", str(image), "--out", str(tmp_path / "f.npy"), *server, "--timeout", "10"]
    return subprocess.run([sys.executable, "-m", "neco.client", *argv], capture_output=True, text=True, timeout=60)


def test_cli_http_against_a_grpc_port_is_one_line(tmp_path: Path, grpc_port: str) -> None:
    done = _cli(tmp_path, "--transport", "http", "--url", grpc_port, "--retries", "5")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert grpc_port in done.stderr and "gRPC port" in done.stderr and "gave up" not in done.stderr  # not retried


def test_cli_url_with_a_scheme_is_one_line(tmp_path: Path) -> None:
    done = _cli(tmp_path, "--transport", "http", "--url", "http://localhost:8000")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Exception ignored" not in done.stderr
    assert "'http://localhost:8000'" in done.stderr and "without a scheme" in done.stderr


# --- two embedded servers on loopback ---------------------------------------------------------
class Replica:
    """An embedded server that can be stopped and started again on the same ports."""

    def __init__(self, repository: Path) -> None:
        from neco.serving import EmbeddedServer, ServeConfig

        self._make = lambda ports: EmbeddedServer(ServeConfig(repository=repository, **ports))
        self.server = self._make({"http_port": 0, "grpc_port": 0, "metrics_port": 0}).start()
        self.ports = {
            "http_port": int(self.server.http_url.rsplit(":", 1)[1]),
            "grpc_port": int(self.server.grpc_url.rsplit(":", 1)[1]),
            "metrics_port": int(self.server.metrics_url.split(":")[2].split("/")[0]),
        }
        self.http_url, self.grpc_url = self.server.http_url, self.server.grpc_url
        self.metrics_url = self.server.metrics_url

    def running(self) -> Replica:
        if not self.server.is_alive():
            self.server = self._make(self.ports).start()
        return self

    def stop(self) -> None:
        self.server.stop()


def successes(metrics_url: str) -> int:
    """Triton's count of successful inference requests (all models), from its Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    return int(sum(float(v) for v in re.findall(r"^nv_inference_request_success\{[^}]*\} (\S+)$", text, re.M)))


@pytest.fixture(scope="module")
def replica(model_repository: Path) -> Iterator[Replica]:
    second = Replica(model_repository)
    yield second
    second.stop()


@pytest.fixture(scope="module")
def image_and_features(triton_server) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    with NecoClient(triton_server.grpc_url, model=triton_server.model_name, size=SIZE) as client:
        return image, client.features(image).features


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_requests_are_spread_over_the_servers(protocol, triton_server, replica, image_and_features) -> None:
    replica.running()
    urls = [getattr(server, f"{protocol}_url") for server in (triton_server, replica)]
    image, expected = image_and_features
    with NecoClient(urls, protocol=protocol, size=SIZE) as client:
        before = [successes(triton_server.metrics_url), successes(replica.metrics_url)]
        for _ in range(8):
            np.testing.assert_allclose(client.features(image).features, expected, atol=1e-4)
        served = counted_successes([triton_server.metrics_url, replica.metrics_url], before, total=8)
    assert served == [4, 4]


def counted_successes(metrics_urls: list[str], before: list[int], total: int, wait_s: float = 10.0) -> list[int]:
    """Successes per server since `before`, once their sum reaches `total` (or `wait_s` passes).

    Triton counts a request as a success after its response is sent, so the counter of the last
    request may lag the answer the client already holds (seen once in CI: [3, 4] read at once).
    """
    deadline = time.monotonic() + wait_s
    while True:
        served = [successes(url) - start for url, start in zip(metrics_urls, before)]
        if sum(served) >= total or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


@pytest.mark.slow
def test_server_stopped_mid_request_and_restarted(replica, image_and_features) -> None:
    """Without retries the caller gets a typed error; with retries the request waits for the restart.

    PyTriton starts only from the main thread, so the stop runs in a thread and the restart here.
    """
    replica.running()
    image, expected = image_and_features
    patient = RetryPolicy(attempts=1000, initial_backoff_s=0.1, max_backoff_s=0.5)
    once = NecoClient(replica.http_url, protocol="http", size=SIZE, retry=RetryPolicy.off())
    retrying = NecoClient(replica.grpc_url, size=SIZE, retry=patient, timeout_s=120)
    stopper = threading.Thread(target=replica.stop)
    stopper.start()
    with pytest.raises(ServerUnavailableError) as caught:
        while True:  # requests in flight while the server stops
            once.features(image)
    assert "gave up" not in str(caught.value) and replica.http_url in str(caught.value)
    stopper.join(60)
    with futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(retrying.features, image)  # starts while the server is down
        time.sleep(0.5)
        assert not answer.done()
        replica.running()
        np.testing.assert_allclose(answer.result(timeout=120).features, expected, atol=1e-4)
    once.close()
    retrying.close()


@pytest.mark.slow
def test_stopping_one_of_two_servers_mid_run_loses_no_request(triton_server, replica, image_and_features) -> None:
    replica.running()
    image, expected = image_and_features
    urls = [triton_server.grpc_url, replica.grpc_url]
    answered: list[np.ndarray] = []
    with NecoClient(urls, size=SIZE, retry=RetryPolicy(initial_backoff_s=0.05)) as client:
        stopper = threading.Timer(0.5, replica.stop)
        stopper.start()
        deadline = time.monotonic() + 30
        while stopper.is_alive() or len(answered) < 24:
            answered.append(client.features(image).features)
            assert time.monotonic() < deadline
        stopper.join()
    assert not replica.server.is_alive() and len(answered) >= 24
    for features in answered:
        np.testing.assert_allclose(features, expected, atol=1e-4)
