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

One supervisor thread lives as long as the server: a tritonserver restarted from it has
that thread as its parent, and PyTriton starts tritonserver with PR_SET_PDEATHSIG, which
would SIGTERM a server whose parent thread had exited.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from neco.errors import NecoError
from neco.serving.processes import (
    ProcessInfo,
    is_running,
    kill_survivors,
    live_stubs,
    mapped_shm,
    process_tree,
    read_process,
    restrict_to_owner,
    unlink_segments,
)

LOGGER = logging.getLogger(__name__)


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
