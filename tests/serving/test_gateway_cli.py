"""`neco gateway` alone in front of a Triton it did not start (the docker compose layout): it
forwards good requests unchanged over HTTP and gRPC, refuses declared-huge ones before Triton
sees them, answers 503 when the upstream is unreachable, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import gzip
import http.client
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from neco.contract import INPUT_IMAGES, OUTPUT_FEATURES
from neco.serving.ports import pick_free_ports

from .conftest import random_images, reap

ANNOUNCED = re.compile(r"gateway on http [\d.]+:(\d+)  grpc [\d.]+:(\d+) ->")


def start_gateway(upstream_http: str, upstream_grpc: str, *overrides: str) -> tuple[subprocess.Popen, str, str]:
    """`neco gateway` on free ports in front of these upstream addresses; (process, http, grpc)."""
    host, http_port = upstream_http.split(":")
    grpc_port = upstream_grpc.split(":")[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "neco.cli", "gateway", f"upstream_host={host}", f"upstream_http_port={http_port}",
         f"upstream_grpc_port={grpc_port}", "http_port=0", "grpc_port=0", "limits.max_side=224", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()
    match = ANNOUNCED.search(line)
    assert match, (line, process.stderr.read() if process.poll() is not None else "")
    return process, f"127.0.0.1:{match.group(1)}", f"127.0.0.1:{match.group(2)}"


@pytest.fixture(scope="module")
def gateway(triton_server) -> Iterator[tuple[subprocess.Popen, str, str]]:
    process, http, grpc = start_gateway(*triton_server.upstream_urls)
    yield process, http, grpc
    reap(process)


def json_infer_body(shape: list[int], data: list[int]) -> bytes:
    """A KServe v2 JSON infer request carrying `images` (uint8) with this declared shape and data."""
    return json.dumps({"inputs": [{"name": INPUT_IMAGES, "shape": shape, "datatype": "UINT8", "data": data}]}).encode()


def post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_good_requests_pass_unchanged(gateway, triton_server, reference_features):
    _, http, grpc = gateway
    images = random_images(3, 2, 28, 42)
    body = json_infer_body(list(images.shape), images.ravel().tolist())
    status, text = post(f"http://{http}/v2/models/{triton_server.model_name}/infer", body)
    assert status == 200, text
    output = next(o for o in json.loads(text)["outputs"] if o["name"] == OUTPUT_FEATURES)
    expected = reference_features(images)[OUTPUT_FEATURES]
    np.testing.assert_allclose(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected, atol=1e-5)
    client = grpcclient.InferenceServerClient(grpc)
    tensor = grpcclient.InferInput(INPUT_IMAGES, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    served = client.infer(triton_server.model_name, [tensor]).as_numpy(OUTPUT_FEATURES)
    client.close()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_answers_are_compressed_only_when_the_client_asks(gateway, triton_server):
    """The gateway adds no Accept-Encoding of its own (Triton gzipping features cost ~110 ms per batch of 8)."""
    _, http_url, _ = gateway
    images = random_images(4, 1, 28, 28)
    body = json_infer_body(list(images.shape), images.ravel().tolist())
    answers = {}
    for asked in (None, "gzip"):
        connection = http.client.HTTPConnection(http_url, timeout=60)
        connection.putrequest("POST", f"/v2/models/{triton_server.model_name}/infer", skip_accept_encoding=True)
        for name, value in [("Content-Length", str(len(body)))] + ([("Accept-Encoding", asked)] if asked else []):
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        answers[asked] = (response.status, response.getheader("Content-Encoding"), response.read())
        connection.close()
    assert answers[None][:2] == (200, None), answers[None][:2]
    assert answers["gzip"][:2] == (200, "gzip"), answers["gzip"][:2]
    plain, unzipped = (json.loads(text) for text in (answers[None][2], gzip.decompress(answers["gzip"][2])))
    assert plain == unzipped


def test_declared_huge_request_is_refused_before_triton(gateway, triton_server):
    _, http, _ = gateway
    body = json_infer_body([1, 59990, 59990, 3], [1, 2, 3])
    status, text = post(f"http://{http}/v2/models/{triton_server.model_name}/infer", body)
    assert status == 400 and "exceeds max_side=224" in text, (status, text)


def test_unreachable_upstream_is_a_retryable_503_and_sigterm_stops_it():
    free_http, free_grpc = pick_free_ports("127.0.0.1", 2)
    process, http, grpc = start_gateway(f"127.0.0.1:{free_http}", f"127.0.0.1:{free_grpc}")
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=10)
        assert refused.value.code == 503
        client = grpcclient.InferenceServerClient(grpc)
        with pytest.raises(Exception, match="UNAVAILABLE"):
            client.is_server_ready()
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        reap(process)


def test_a_grpc_client_on_the_http_port_logs_one_line_not_a_traceback():
    """docs/serving.md promises quiet logs: HTTP/2 (gRPC) bytes sent to the HTTP port give one warning line."""
    free_http, free_grpc = pick_free_ports("127.0.0.1", 2)
    process, http, _ = start_gateway(f"127.0.0.1:{free_http}", f"127.0.0.1:{free_grpc}")
    try:
        client = grpcclient.InferenceServerClient(http)  # the wrong port: it speaks HTTP/1.1
        with pytest.raises(Exception):  # noqa: B017 - whatever gRPC makes of an HTTP/1.1 answer
            client.is_server_live(client_timeout=5)
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        stderr = process.stderr.read()
    finally:
        reap(process)
    assert "Traceback" not in stderr, stderr
    assert "not an HTTP/1.x request on the HTTP port" in stderr, stderr
