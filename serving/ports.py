"""The embedded server's ports: a configured port checked before anything starts, port 0 chosen safely.

Kept apart from the server's life cycle (`neco.serving.embedded`): tests and tools pick free
ports with the same rule the server uses.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

from neco.errors import EXIT_USAGE, NecoError

CHOSEN_PORT_FLOOR = 20000
"""Ports chosen for port 0 lie between this and the kernel's ephemeral range (see `pick_free_ports`)."""
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class PortInUseError(NecoError, OSError):
    """A port the server is configured to bind is taken by another process (exit status 2)."""

    exit_code = EXIT_USAGE


def pick_free_ports(host: str, count: int, exclude: Collection[int] = ()) -> list[int]:
    """`count` distinct free TCP ports not in `exclude`, all held open until all are chosen.

    tritonserver cannot report a port it chose itself, so port 0 is resolved here, and it binds
    the port seconds later (after loading the model). A port the kernel hands out for port 0 lies
    in its ephemeral range, from which every outgoing connection on the machine also takes its
    local port: with another busy server on the machine, one of its connections could hold the
    port by then, tritonserver exited, and the start waited two minutes (issue 31). Ports below
    that range are only ever taken by an explicit bind, so they are tried first, in random order.
    """
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = CHOSEN_PORT_FLOOR
    candidates = [port for port in range(CHOSEN_PORT_FLOOR, low) if port not in exclude]
    random.SystemRandom().shuffle(candidates)
    sockets: list[socket.socket] = []
    try:
        for port in [*candidates, *[0] * (count + len(exclude))]:  # the kernel's choice only when those run out
            if len(sockets) == count:
                break
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            if sock.getsockname()[1] in exclude:
                sock.close()
                continue
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail before Triton starts when a configured port is taken (a second server, another service).

    Otherwise tritonserver fails to bind while PyTriton's readiness check talks to whatever
    listens there (e.g. another PyTriton: a 403 "expecting header 'triton-access-token'").
    SO_REUSEADDR as Triton binds, so a port in TIME_WAIT after a restart is not reported.
    """
    for name, port in ports.items():
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise PortInUseError(
                    f"port {port} ({name}) on {host} is in use ({exc.strerror}); stop the other server or choose "
                    f"another port ({name}=PORT, 0 = a free one)"
                ) from None
