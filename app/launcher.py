"""`neco app --serve REPOSITORY`: the embedded Triton server started and stopped with the page.

The server runs as a child process (`python -m neco.serving`): the page may not import the
serving stage (it would pull PyTriton into a client install), and a child keeps Triton's own
threads and signal handling out of uvicorn's. To the user it is still one process: SIGTERM or
Ctrl+C on `neco app` stops the page, then the server; the child is also told by the kernel to
stop when its parent dies (Linux `PR_SET_PDEATHSIG`), so a killed page leaves no server behind.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from neco.errors import NecoError

READY = re.compile(r"^serving \S+ .* grpc (\S+) ")
"""The line `neco serve` prints once the server answers (its gRPC address is what the page needs)."""
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
TAIL_LINES = 20


class ServerStartError(NecoError, RuntimeError):
    """The embedded server exited, or did not become ready, before the page could use it."""

    exit_code = 1


def _die_with_parent() -> None:
    """In the child, before exec: ask for SIGTERM when the parent dies (Linux only; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def server_command(repository: Path, model: str) -> list[str]:
    """`neco serve` of `model` on free loopback ports (the page learns the gRPC one from the ready line)."""
    settings = ["http_port=0", "grpc_port=0", "metrics_port=0", "host=127.0.0.1", f"model_name={model}"]
    return [sys.executable, "-m", "neco.serving", "--repository", str(repository), *settings]


@contextmanager
def embedded_server(repository: Path, model: str, timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """Start `neco serve` of `model` on `repository`, yield its gRPC host:port once ready, stop it on exit.

    While the context is open, SIGTERM raises KeyboardInterrupt like Ctrl+C (uvicorn, which handles
    both itself while it runs, raises the signal again once it has shut down), so the server is
    stopped on every way out.
    Its output is relayed to this process's stderr, prefixed, so its failures stay visible.
    """
    child = subprocess.Popen(
        server_command(repository, model),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - runs only prctl, no locks or threads involved
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    ready = threading.Event()
    found: list[str] = []

    def relay() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.rstrip("\n")
            match = READY.match(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
            else:
                tail.append(line)
            print(f"[neco serve] {line}", file=sys.stderr, flush=True)
        ready.set()

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    threading.Thread(target=relay, name="neco-serve-output", daemon=True).start()
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if time.monotonic() > deadline:
                raise ServerStartError(f"the embedded server on {repository} was not ready after {timeout_s:.0f} s")
        if not found:
            last = " | ".join(line for line in tail if line.strip())[-1500:] or "no output"
            raise ServerStartError(f"the embedded server on {repository} exited with {child.wait()}: {last}")
        yield found[0]
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(child)


def stop(child: subprocess.Popen[str]) -> None:
    """SIGTERM, a grace period for Triton to shut down, then SIGKILL."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
