"""`BackendSupervisor`: watch the tritonserver process tree, report a dead backend, clean up after it.

Triton keeps `/v2/health/ready` and model-ready green after its python-backend stub died
(every later request fails with "Stub process ... is not healthy"), and PyTriton does not
notice either. The supervisor polls `/proc` a few times a second: when the stub (or
tritonserver itself) is gone it calls `on_backend_death` once, so the embedded server can
stop the dead server at once (readiness goes false) and restart it or exit non-zero.

While watching it also remembers every process of the tree and every `/dev/shm` segment
they mapped, so `clean_up()` after tritonserver's exit can end the survivors (the stub
ignores SIGTERM) and unlink their segments, and it restricts those segments to this user
(PyTriton's backend regions are created 0644 and hold request images).

Before any of that, `wait_until_listening` watches the start itself: tritonserver binds its ports
only after loading the model and exits at once when one is taken, while PyTriton's readiness
check would poll for 120 s (and could be answered by whichever server holds the port); the
wait ends the moment tritonserver exits, and `likely_cause` reads the reason from its log.

One supervisor thread lives as long as the server: a tritonserver restarted from it has
that thread as its parent, and PyTriton starts tritonserver with PR_SET_PDEATHSIG, which
would SIGTERM a server whose parent thread had exited.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from neco.errors import NecoError
from neco.serving.processes import (
    ProcessInfo,
    is_running,
    kill_survivors,
    listening_ports,
    live_stubs,
    mapped_shm,
    process_tree,
    read_process,
    restrict_to_owner,
    unlink_segments,
)

LOGGER = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0
"""How long tritonserver may take to load the model and bind its ports (PyTriton waits as long)."""
PORT_TAKEN = re.compile(r"failed to start (\w+) service: .*?'([^']*):(\d+)' already in use")
LOG_TAIL_LINES = 20
MODEL_FAILED = re.compile(r"failed to load '([^']+)'[^:]*: (.+?)\"?$", re.M)


def wait_until_listening(pid: int, ports: Mapping[int, str], timeout_s: float = START_TIMEOUT_S) -> str | None:
    """Wait until tritonserver (`pid`) itself listens on every port of `ports`; None, or why it did not."""
    root = read_process(pid)
    deadline = time.monotonic() + timeout_s
    while root is not None and is_running(root):
        missing = set(ports) - listening_ports(pid)
        if not missing:
            return None
        if time.monotonic() >= deadline:
            return f"tritonserver did not open {', '.join(ports[p] for p in sorted(missing))} within {timeout_s:.0f} s"
        time.sleep(0.1)
    return "tritonserver exited while starting"


def tail_lines(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a tritonserver log, without blank lines and its start-up tables."""
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith(("|", "+"))]
    return "\n".join(kept[-lines:])


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The end of Triton's log file, for an error message ('' when there is none)."""
    if path is None or not path.is_file():
        return ""
    return tail_lines(path.read_text(errors="replace"), lines)


def taken_port(log: str) -> int | None:
    """The port tritonserver's log says another process holds, if any."""
    taken = PORT_TAKEN.search(log)
    return int(taken.group(3)) if taken else None


def likely_cause(log: str, ports: Mapping[int, str]) -> str:
    """The likely reason for a failed start, from the end of tritonserver's log and the ports it was given."""
    port = taken_port(log)
    if port is not None:
        what = ports.get(port, "one of its ports")
        return (
            f"port {port} ({what}) was taken by another process before tritonserver could bind it; free it or "
            f"choose another port (a port set to 0 is chosen anew at every start)"
        )
    failed = MODEL_FAILED.search(log)
    if failed:
        return f"model {failed.group(1)!r} failed to load: {failed.group(2).strip()}"
    if not log.strip():
        return "it left no log; `neco serve --verbose` shows its console"
    return "the end of its log (below) says why"


class ProcessTree:
    """Everything one tritonserver tree ever held: its processes and their `/dev/shm` segments."""

    def __init__(self, root_pid: int):
        root = read_process(root_pid)
        if root is None:
            raise NecoError(f"tritonserver (pid {root_pid}) is not running")
        self.root = root
        self.processes: dict[tuple[int, int], ProcessInfo] = {}
        self.segments: set[Path] = set()
        # PyTriton's proxy in this process maps the request/response segments too; those it maps
        # from now on belong to this server (what this process mapped before is not ours to remove)
        self._host = read_process(os.getpid())
        self._host_before = mapped_shm([self._host]) if self._host is not None else set()

    def refresh(self) -> str | None:
        """Record the tree and its segments; return why the backend is dead, or None if it lives."""
        tree = process_tree(self.root.pid) if is_running(self.root) else []
        for info in tree:
            self.processes.setdefault((info.pid, info.start_time), info)
        segments = mapped_shm(tree)
        if self._host is not None:
            segments |= mapped_shm([self._host]) - self._host_before
        restrict_to_owner(segments - self.segments)
        self.segments |= segments
        if not tree:
            return f"tritonserver (pid {self.root.pid}) exited"
        if not live_stubs(self.root.pid):
            return "the python-backend stub process died"
        return None

    def clean_up(self) -> None:
        """After tritonserver stopped: kill every process of the tree left, unlink its segments."""
        self.refresh()
        survivors = kill_survivors(list(self.processes.values()))
        if survivors:
            LOGGER.warning("processes survived SIGKILL: %s", [p.pid for p in survivors])
        unlink_segments(self.segments)


class BackendSupervisor:
    """Poll the watched `ProcessTree` every `poll_s` seconds; call `on_backend_death` when it dies."""

    def __init__(self, on_backend_death: Callable[[str], None], poll_s: float = 0.25):
        self.poll_s = poll_s
        self._on_backend_death = on_backend_death
        self._tree: ProcessTree | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neco-backend-supervisor", daemon=True)

    def watch(self, tree: ProcessTree) -> None:
        """Supervise `tree` from now on (starting the poll thread on first use)."""
        problem = tree.refresh()
        if problem:
            raise NecoError(f"the served model has no running backend: {problem}")
        with self._lock:
            self._tree = tree
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def unwatch(self) -> None:
        """Stop supervising the current tree (it is being stopped on purpose)."""
        with self._lock:
            self._tree = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                tree = self._tree
            problem = tree.refresh() if tree is not None else None
            if problem:
                LOGGER.error("backend failure: %s", problem)
                self.unwatch()
                self._on_backend_death(problem)

    def close(self) -> None:
        """End the poll thread (waits for it unless called from it)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
