"""Issue 34 item 2: no key on tritonserver's command line, no admin route from outside, no model swap.

These tests do what a local attacker did: read every server process's `/proc/PID/cmdline` (the
old server put PyTriton's access token there, `--http-restricted-api=...:triton-access-token=T`),
send whatever key was found through the gateway to list, unload and load models, and then try
the same on tritonserver's private loopback port.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from neco.serving import EmbeddedServer, ServeConfig
from neco.serving.public_routes import is_public_http

RESTRICTED_FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol")
GUESSED_KEY = {"triton-access-token": "guess"}
ADMIN_HTTP = [
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{model}/unload"),
    ("POST", "/v2/repository/models/{model}/load"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v2/systemsharedmemory/region/r/register"),
    ("GET", "/v2/cudasharedmemory/status"),
    ("GET", "/v2/models/stats"),
    ("GET", "/v2/models/{model}/stats"),
    ("GET", "/v2/models/{model}/versions/1/stats"),
    ("GET", "/v2/logging"),
    ("GET", "/v2/trace/setting"),
    ("GET", "/v2/models/{model}/trace/setting"),
]
ADMIN_GRPC = {
    "RepositoryIndex": service_pb2.RepositoryIndexRequest(),
    "RepositoryModelUnload": service_pb2.RepositoryModelUnloadRequest(model_name="neco_dinov2"),
    "SystemSharedMemoryStatus": service_pb2.SystemSharedMemoryStatusRequest(),
    "CudaSharedMemoryStatus": service_pb2.CudaSharedMemoryStatusRequest(),
    "ModelStatistics": service_pb2.ModelStatisticsRequest(),
    "LogSettings": service_pb2.LogSettingsRequest(),
    "TraceSetting": service_pb2.TraceSettingRequest(),
}


@pytest.fixture(scope="module")
def server(model_repository) -> Iterator[EmbeddedServer]:
    """A server of its own: on a regression the attack below unloads its model."""
    with EmbeddedServer(ServeConfig(repository=model_repository, http_port=0, grpc_port=0, metrics_port=0)) as running:
        yield running


def command_lines(server: EmbeddedServer) -> dict[int, list[str]]:
    """argv of tritonserver and every process under it, as any local user reads them."""
    found = {}
    for pid in server.process_ids():
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
    return found


def harvested_headers(server: EmbeddedServer) -> dict[str, str]:
    """Every restricted-API `key=value` readable on the command lines, else a guessed one."""
    keys = {}
    for argv in command_lines(server).values():
        for flag, value in zip(argv, argv[1:]):
            if flag in RESTRICTED_FLAGS or flag.startswith(tuple(f + "=" for f in RESTRICTED_FLAGS)):
                setting = value if flag in RESTRICTED_FLAGS else flag.split("=", 1)[1]
                key, _, secret = setting.split(":", 1)[1].partition("=")
                keys[key] = secret
    return keys or GUESSED_KEY


def http(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def model_ready(server: EmbeddedServer) -> bool:
    return http(f"http://{server.http_url}/v2/models/{server.model_name}/ready") == 200


def test_no_access_key_on_any_server_process_command_line_or_environment(server):
    argvs = command_lines(server)
    assert argvs, "tritonserver's command line was expected to be readable"
    for pid, argv in argvs.items():
        flagged = [arg for arg in argv if arg.startswith(RESTRICTED_FLAGS) or "access-token" in arg]
        assert not flagged, f"pid {pid} shows a restricted-API key on its command line: {flagged}"
        environ = Path(f"/proc/{pid}/environ")
        info = environ.stat()
        assert info.st_uid == os.getuid() and info.st_mode & 0o077 == 0, "the environment must be the owner's only"
        assert b"access-token" not in environ.read_bytes().lower(), f"pid {pid} has an access token in its environment"


def test_admin_routes_are_refused_by_the_gateway_whatever_key_is_sent(server):
    headers = {**harvested_headers(server), "Content-Type": "application/json"}
    for method, path in ADMIN_HTTP:
        url = f"http://{server.http_url}{path.format(model=server.model_name)}"
        assert http(url, method, {} if method == "POST" else None, headers) == 403, (method, path)
    metadata = [(f"triton-grpc-protocol-{key}", value) for key, value in harvested_headers(server).items()]
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, message in ADMIN_GRPC.items():
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, name)(message, metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
    assert model_ready(server)
    for path in ("/v2", f"/v2/models/{server.model_name}", f"/v2/models/{server.model_name}/config"):
        assert http(f"http://{server.http_url}{path}") == 200, path


def test_models_cannot_be_loaded_or_unloaded_even_on_the_private_port(server, tmp_path):
    """tritonserver runs with model control mode `none`: no caller, with or without a key, swaps the model."""
    marker = tmp_path / "ran"
    model_py = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass TritonPythonModel:\n    pass\n"
    upload = {
        "parameters": {
            "config": json.dumps({"backend": "python", "max_batch_size": 0, "input": [], "output": []}),
            "file:1/model.py": base64.b64encode(model_py.encode()).decode(),
        }
    }
    private_http, private_grpc = server.upstream_urls
    headers = {**harvested_headers(server), "Content-Type": "application/json"}
    assert http(f"http://{private_http}/v2/repository/models/intruder/load", "POST", upload, headers) != 200
    unload = f"http://{private_http}/v2/repository/models/{server.model_name}/unload"
    assert http(unload, "POST", {}, headers) != 200
    metadata = [(f"triton-grpc-protocol-{key}", value) for key, value in harvested_headers(server).items()]
    with grpc.insecure_channel(private_grpc) as channel:
        with pytest.raises(grpc.RpcError):
            service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                service_pb2.RepositoryModelUnloadRequest(model_name=server.model_name), metadata=metadata, timeout=30
            )
    assert not marker.exists(), "an uploaded python model ran"
    assert model_ready(server)


@pytest.mark.parametrize(
    "path, public",
    [
        ("/v2", True),
        ("/v2/health/live", True),
        ("/v2/health/ready", True),
        ("/v2/models/neco_dinov2", True),
        ("/v2/models/neco_dinov2/versions/1/infer", True),
        ("/v2/models/neco_dinov2/config", True),
        ("/v2/models/stats/ready", True),  # a model named "stats"
        ("/v2/models/stats", False),
        ("/v2/models/neco_dinov2/stats", False),
        ("/v2/models/neco_dinov2/versions/x/infer", False),
        ("/v2/repository/index", False),
        ("/v2/repository/models/neco_dinov2/load", False),
        ("/v2/systemsharedmemory/region/r/register", False),
        ("/v2/logging", False),
        ("/v2/trace/setting", False),
        ("/v2/models/neco_dinov2/generate", False),
        ("/metrics", False),
    ],
)
def test_public_http_routes_are_an_allow_list(path, public):
    assert is_public_http(path) is public
