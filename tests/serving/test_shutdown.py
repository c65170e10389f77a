"""`neco serve` leaves nothing behind: SIGTERM under load, and a backend that died (issue 14, items 1, 3).

Each test runs its own `python -m neco.serving` and watches its process tree and the
`/dev/shm` segments that tree maps, from `/proc`, independently of the server's own cleanup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from neco.contract import INPUT_IMAGES
from neco.serving.ports import pick_free_ports

from .conftest import reap
from .procfs import alive, descendants, shm_mapped_by
from .test_cli import STARTUP_TIMEOUT_S, wait_ready

pytestmark = pytest.mark.slow


def start_serve(model_repository: Path, log_path: Path, *overrides: str) -> tuple[subprocess.Popen, int, int]:
    http, grpc_port, metrics = pick_free_ports("127.0.0.1", 3)
    process = subprocess.Popen(
        [sys.executable, "-m", "neco.serving", "--repository", str(model_repository), f"http_port={http}",
         f"grpc_port={grpc_port}", f"metrics_port={metrics}", "intra_op_threads=1", *overrides],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_ready(f"127.0.0.1:{http}", process, STARTUP_TIMEOUT_S)
    deadline = time.monotonic() + 60  # Triton is ready a moment before PyTriton has connected to it
    while "serving neco_dinov2 v" not in log_path.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-2000:]
        time.sleep(0.1)
    return process, http, grpc_port


def snapshot(process: subprocess.Popen) -> tuple[set[int], set[Path]]:
    """The server's descendants and the shared-memory segments it and they map right now."""
    children = descendants(process.pid)
    return children, shm_mapped_by(children | {process.pid})


def assert_nothing_left(children: set[int], segments: set[Path]) -> None:
    deadline = time.monotonic() + 10  # orphans are killed by the server; give the kernel a moment
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)], "processes of the stopped server still run"
    assert not [str(p) for p in segments if p.exists()], "shared-memory segments of the stopped server remain"


def keep_busy(grpc_url: str, stop: threading.Event, outcomes: list[str]) -> None:
    """Send 224 x 224 requests until `stop`, recording "ok" or the error class of each."""
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        while not stop.is_set():
            tensor = grpcclient.InferInput(INPUT_IMAGES, list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            try:
                client.infer("neco_dinov2", [tensor], client_timeout=30)
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001 - the server is being stopped under us
                outcomes.append(type(exc).__name__)
                time.sleep(0.05)
    finally:
        client.close()


def test_sigterm_under_load_ends_every_child_and_segment(model_repository, tmp_path):
    process, _, grpc_port = start_serve(model_repository, tmp_path / "serve.log")
    stop, outcomes = threading.Event(), []
    workers = [threading.Thread(target=keep_busy, args=(f"127.0.0.1:{grpc_port}", stop, outcomes)) for _ in range(8)]
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while outcomes.count("ok") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        children, segments = snapshot(process)
        assert any(Path(f"/proc/{pid}/comm").read_text().strip() == "triton_python_b" for pid in children)
        assert segments, "a serving tritonserver maps its python-backend region from /dev/shm"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        reap(process)
    assert outcomes.count("ok") >= 4
    assert_nothing_left(children, segments)
    said = (tmp_path / "serve.log").read_text()
    assert "exited with failure" not in said and "fork_posix" not in said, said  # a stop on purpose is quiet


def test_dead_backend_without_restart_exits_nonzero_and_cleans_up(model_repository, tmp_path):
    log = tmp_path / "serve.log"
    process, http, _ = start_serve(model_repository, log, "restart_on_backend_failure=false")
    try:
        children, segments = snapshot(process)
        stubs = [pid for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "triton_python_b"]
        assert stubs, "the python-backend stub runs under tritonserver"
        os.kill(stubs[0], signal.SIGKILL)  # requests cannot kill it through the gateway any more
        assert process.wait(timeout=30) == 1
    finally:
        reap(process)
    assert "backend failed (the python-backend stub process died)" in log.read_text()
    assert_nothing_left(children, segments)


def test_default_bind_is_loopback():
    from neco.serving import ServeConfig

    assert ServeConfig(repository=Path(os.devnull)).host == "127.0.0.1"
