"""`python -m neco.serving` runs until SIGTERM and exits cleanly; bad input exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from neco.serving.embedded import pick_free_ports

STARTUP_TIMEOUT_S = 180


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early with {process.returncode}"
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server at {url} not ready after {timeout_s} s")


def test_module_entry_point_serves_until_sigterm(model_repository, tmp_path):
    http, grpc, metrics = pick_free_ports("127.0.0.1", 3)
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "neco.serving", "--repository", str(model_repository),
         f"http_port={http}", f"grpc_port={grpc}", f"metrics_port={metrics}", "intra_op_threads=1"],
        stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"},
    )  # fmt: skip
    try:
        wait_ready(f"127.0.0.1:{http}", process, STARTUP_TIMEOUT_S)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
            assert b"nv_inference_count" in response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert f"serving neco_dinov2: http 127.0.0.1:{http}" in output
    assert "received SIGTERM, shutting down" in output


def test_missing_repository_exits_with_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "neco.serving", "--repository", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_invalid_override_exits_with_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "neco.serving", "--repository", str(tmp_path), "http_port=70000", "colour=red"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "http_port" in result.stderr and "colour" in result.stderr
