"""The tritonserver process tree and its `/dev/shm` segments, read from `/proc` (Linux only).

Why this exists: Triton's python-backend stub and the stub's helper processes ignore SIGTERM,
and after tritonserver's exit timeout (or a stub crash) they survive as orphans that keep
their shared-memory segments in `/dev/shm`. PyTriton does not clean up after them, so the
embedded server snapshots the tree while it is running, and after stopping tritonserver
kills what is left and unlinks every segment those processes had mapped. A process is
identified by (pid, start time), so a pid reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
SHM = Path("/dev/shm")
STUB_NAME = "triton_python_b"
"""`comm` of Triton's python-backend stub (`triton_python_backend_stub`, cut to 15 characters)."""
TCP_LISTEN = "0A"
"""The `st` column of a listening socket in `/proc/net/tcp`."""


@dataclass(frozen=True)
class ProcessInfo:
    """One process as `/proc/<pid>/stat` describes it."""

    pid: int
    ppid: int
    name: str
    state: str
    start_time: int
    """Clock ticks since boot at which the process started: with the pid, a unique identity."""


def read_process(pid: int) -> ProcessInfo | None:
    """The process `pid`, or None if it no longer exists."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # `comm` is in parentheses and may itself contain spaces or ")": split at the last ")".
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcessInfo(pid=pid, ppid=int(fields[1]), name=name, state=fields[0], start_time=int(fields[19]))


def all_processes() -> list[ProcessInfo]:
    """Every process visible in `/proc` right now."""
    infos = (read_process(int(p.name)) for p in PROC.iterdir() if p.name.isdigit())
    return [info for info in infos if info is not None]


def process_tree(root: int) -> list[ProcessInfo]:
    """`root` and all its descendants (root first); empty if `root` is gone."""
    processes = all_processes()
    children: dict[int, list[ProcessInfo]] = {}
    for info in processes:
        children.setdefault(info.ppid, []).append(info)
    top = next((p for p in processes if p.pid == root), None)
    if top is None:
        return []
    tree, todo = [], [top]
    while todo:
        info = todo.pop()
        tree.append(info)
        todo.extend(children.get(info.pid, []))
    return tree


def is_running(info: ProcessInfo) -> bool:
    """True while the very same process (pid and start time) exists and is not a zombie."""
    now = read_process(info.pid)
    return now is not None and now.start_time == info.start_time and now.state not in ("Z", "X")


def live_stubs(root: int) -> list[ProcessInfo]:
    """Python-backend stubs under `root` that are running (a crashed stub is a zombie or gone)."""
    return [p for p in process_tree(root) if p.name == STUB_NAME and p.state not in ("Z", "X")]


def mapped_shm(processes: list[ProcessInfo]) -> set[Path]:
    """The `/dev/shm` files the given processes have mapped (from `/proc/<pid>/maps`)."""
    found: set[Path] = set()
    for info in processes:
        try:
            lines = (PROC / str(info.pid) / "maps").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in lines:
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) == 6 else ""
            if path.startswith(f"{SHM}/"):
                found.add(Path(path.removesuffix(" (deleted)")))
    return found


def restrict_to_owner(paths: set[Path]) -> None:
    """chmod 0600 every existing segment this user owns (PyTriton's backend regions are 0644)."""
    for path in paths:
        try:
            info = path.stat()
            if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
                path.chmod(0o600)
        except FileNotFoundError:
            continue


def kill_survivors(processes: list[ProcessInfo], timeout_s: float = 5.0) -> list[ProcessInfo]:
    """SIGKILL every listed process still running, wait for them to go; return those that did not."""
    for info in processes:
        if is_running(info):
            try:
                os.kill(info.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    remaining = [p for p in processes if is_running(p)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [p for p in remaining if is_running(p)]
    return remaining


def unlink_segments(paths: set[Path]) -> None:
    """Remove the given `/dev/shm` segments (those already gone are skipped)."""
    for path in paths:
        path.unlink(missing_ok=True)


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` itself listens on (empty once it is gone).

    Its socket inodes (from `/proc/<pid>/fd`) matched against the LISTEN rows of its network
    namespace's `/proc/<pid>/net/tcp{,6}`: a port another process holds does not count, so a
    health check answered by someone else's server is never mistaken for this one's.
    """
    fd_dir = PROC / str(pid) / "fd"
    inodes: set[str] = set()
    try:
        fds = list(fd_dir.iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return set()
    for fd in fds:
        try:
            target = os.readlink(fd)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (PROC / str(pid) / "net" / table).read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == TCP_LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
