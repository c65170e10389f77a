"""`python -m neco.serving` runs until SIGTERM and exits cleanly; bad input exits at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from neco.serving.ports import pick_free_ports

from .conftest import reap

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


def serve_until_sigterm(model_repository, tmp_path, *flags: str) -> tuple[str, str, tuple[int, int, int]]:
    """Run `python -m neco.serving` until ready, check metrics, SIGTERM it (exit 0); its stdout and stderr."""
    http, grpc, metrics = pick_free_ports("127.0.0.1", 3)
    log, err = (tmp_path / "serve.log").open("w"), (tmp_path / "serve.err").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "neco.serving", "--repository", str(model_repository), *flags,
         f"http_port={http}", f"grpc_port={grpc}", f"metrics_port={metrics}", "intra_op_threads=1"],
        stdout=log, stderr=err, env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"},
    )  # fmt: skip
    try:
        wait_ready(f"127.0.0.1:{http}", process, STARTUP_TIMEOUT_S)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
            assert b"nv_inference_count" in response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        reap(process)
        log.close()
        err.close()
    return (tmp_path / "serve.log").read_text(), (tmp_path / "serve.err").read_text(), (http, grpc, metrics)


def test_module_entry_point_serves_until_sigterm_quietly(model_repository, tmp_path):
    """One stdout line by default (Triton's 60-line tables go to a log file), SIGTERM ends it with 0."""
    stdout, stderr, (http, grpc, metrics) = serve_until_sigterm(model_repository, tmp_path)
    assert stdout.splitlines() == [
        f"serving neco_dinov2 v1 (CPUExecutionProvider) on http 127.0.0.1:{http}  grpc 127.0.0.1:{grpc}  "
        f"metrics http://127.0.0.1:{metrics}/metrics  (Ctrl+C or SIGTERM to stop)"
    ], stdout
    # one line: no PyTriton INFO lines, no Triton tables, no gRPC fork_posix.cc line, no "exited with failure"
    (line,) = stderr.splitlines()
    assert line.endswith("neco.serving.embedded INFO received SIGTERM, shutting down"), stderr


@pytest.mark.slow  # a second server start (~1 min on 2 cores)
def test_verbose_shows_tritons_log(model_repository, tmp_path):
    stdout, stderr, _ = serve_until_sigterm(model_repository, tmp_path, "--verbose")
    assert "Started GRPCInferenceService" in stdout and len(stdout.splitlines()) > 10  # Triton's own log
    assert "serving neco_dinov2 v1" in stdout
    assert "pytriton" in stderr and " INFO " in stderr  # PyTriton's INFO lines


def run_serve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neco.serving", *argv], capture_output=True, text=True, timeout=120, env=env
    )


def test_busy_port_is_one_message_before_triton_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--repository", str(tmp_path), f"grpc_port={port}", "http_port=0", "metrics_port=0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0], result.stderr  # one line
    assert f"port {port} (grpc_port) on 127.0.0.1 is in use" in result.stderr


def test_unknown_model_name_lists_the_repository_models(tmp_path):
    for name in ("neco_dinov2", "dinov2_stock"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    (tmp_path / "not_a_model").mkdir()
    result = run_serve("--repository", str(tmp_path), "model_name=nope", "http_port=0", "grpc_port=0", "metrics_port=0")
    assert result.returncode == 2, result.stderr
    assert "model 'nope' is not in" in result.stderr and "['dinov2_stock', 'neco_dinov2']" in result.stderr


def test_help_shows_the_serve_config_defaults():
    result = run_serve("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for setting in ("host=127.0.0.1", "http_port=8000", "grpc_port=8001", "metrics_port=8002", "--verbose"):
        assert setting in text, setting


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
