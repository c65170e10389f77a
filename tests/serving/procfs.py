"""Test-side `/proc` reading, written independently of `neco.serving.processes`."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of `pid`, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = raw.rsplit(")", 1)[1].split()[:2]
    return int(ppid), state


def descendants(root: int) -> set[int]:
    """Every live process below `root` (not `root` itself)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            parents[int(entry)] = info[0]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    info = _stat(pid)
    return info is not None and info[1] not in ("Z", "X")


def shm_mapped_by(pids: set[int]) -> set[Path]:
    """`/dev/shm` files mapped by any of `pids`."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found |= {Path(line.split()[-1]) for line in maps.splitlines() if " /dev/shm/" in line}
    return found


def rss_bytes(pids: set[int]) -> int:
    """Summed resident memory of the live `pids`."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total
