"""How `NecoClient` reaches its servers: URL lists, round-robin with failover, retries, typed errors.

Why here and not in a load balancer: gRPC keeps one long-lived HTTP/2 connection per client,
so a plain L4 Service (Kubernetes ClusterIP) pins every request of a client to one replica.
The client therefore takes several server URLs (or a `dns:///name:port` that resolves to
many, e.g. a headless Service), sends each request to the next one in turn, and fails over
to another on a retryable error. Every request the client sends is a pure function of its
input (features of images), so retrying one that may already have run is safe.

Every exception the transport libraries raise (tritonclient, grpc, geventhttpclient, gevent,
sockets) becomes one of the client's typed errors in `translate`; nothing else leaks.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tritonclient.utils import InferenceServerException

from neco.client.errors import (
    ClientError,
    EndpointError,
    InferenceError,
    ModelNotReadyError,
    ServerOverloadedError,
    ServerUnavailableError,
)

T = TypeVar("T")
DNS_PREFIX = "dns:///"
"""gRPC's naming scheme for 'every address of this name' (`dns:///triton-headless:8001`)."""


class RetryPolicy(BaseModel):
    """Retries of one client call with exponential backoff; `RetryPolicy.off()` sends once.

    `attempts` counts every try, the first included, over all servers. A call fails over to
    the next server at once and waits `backoff` only after each server has been tried; no
    attempt starts and no wait runs past the caller's deadline (`NecoClient.timeout_s`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(4, ge=1, description="tries per call, first included (1 = no retries)")
    initial_backoff_s: float = Field(0.1, ge=0, description="wait after the first full round of failures")
    max_backoff_s: float = Field(2.0, ge=0, description="cap of the doubling wait")
    multiplier: float = Field(2.0, ge=1, description="growth of the wait per round")
    jitter: float = Field(0.2, ge=0, le=1, description="each wait is shortened by up to this share, at random")

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicy:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) < initial_backoff_s ({self.initial_backoff_s})")
        return self

    @classmethod
    def off(cls) -> RetryPolicy:
        """Send each request once: the first error is the caller's."""
        return cls(attempts=1)

    def backoff_s(self, round_: int, rng: random.Random) -> float:
        """Wait after `round_` (1, 2, ...) full rounds of failed attempts; jitter spreads the retries of many clients."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (round_ - 1))
        return base * (1.0 - self.jitter * rng.random())


def _check_host_port(url: str, given: str) -> tuple[str, int]:
    host, sep, port = url.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EndpointError(f"server URL {given!r} must be host:port (for example localhost:8001)")
    return host, int(port)


def parse_urls(urls: str | Sequence[str], resolve: Callable[..., list] = socket.getaddrinfo) -> list[str]:
    """`host:port` strings from a URL, a comma-separated list, or a sequence; `dns:///` names expanded.

    A scheme such as `http://` is refused with a clear message (the protocol is chosen by
    `protocol=` / `--transport`, and tritonclient would fail on it with a traceback).
    """
    items = [part.strip() for part in urls.split(",")] if isinstance(urls, str) else [str(u).strip() for u in urls]
    out: list[str] = []
    for given in items:
        if not given:
            raise EndpointError(f"empty server URL in {urls!r}")
        if given.startswith(DNS_PREFIX):
            out.extend(_resolve(given, resolve))
            continue
        if "://" in given:
            raise EndpointError(
                f"server URL {given!r}: give host:port without a scheme; the protocol is chosen by "
                f"protocol= / --transport (grpc or http)"
            )
        _check_host_port(given, given)
        out.append(given)
    if not out:
        raise EndpointError("no server URL given")
    return list(dict.fromkeys(out))  # a name listed twice would get twice the traffic


def _resolve(given: str, resolve: Callable[..., list]) -> list[str]:
    """Every TCP address of a `dns:///host:port` name, in resolver order (IPv6 as `[addr]:port`)."""
    host, port = _check_host_port(given[len(DNS_PREFIX) :], given)
    try:
        infos = resolve(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ServerUnavailableError(given, f"the name does not resolve: {exc}") from None
    addresses = [info[4][0] for info in infos]
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in dict.fromkeys(addresses)]


def translate(exc: BaseException, url: str, protocol: str, what: str) -> ClientError:
    """The client's typed error for any exception a transport library raised during `what`."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status() or ""), exc.message() or str(exc)
        if status == "413" or "larger than max" in message:  # the server's size limits, not load
            return InferenceError(f"{what} on {url!r} ({protocol}): request too large for the server: {message}")
        if "queue" in message.lower() or "RESOURCE_EXHAUSTED" in status or status == "429":
            return ServerOverloadedError(f"{what} on {url!r} ({protocol}): server busy: {message}")
        if "UNAVAILABLE" in status or status == "503":
            return ServerUnavailableError(url, f"{what}: {message}")
        if what == "inference" and ("no available versions" in message or "unknown model" in message.lower()):
            # the contract was read from this server, so its model was unloaded since: a replica stopping
            return ModelNotReadyError(f"{what} on {url!r} ({protocol}): the model was unloaded: {message}")
        if "DEADLINE_EXCEEDED" in status:
            return InferenceError(f"{what} on {url!r} ({protocol}): no answer before the deadline ({message})")
        return InferenceError(f"{what} on {url!r} ({protocol}) failed: {message}")
    if isinstance(exc, http.client.HTTPException):  # geventhttpclient: connection closed, not HTTP
        from geventhttpclient.response import HTTPConnectionClosed

        if isinstance(exc, HTTPConnectionClosed):
            return ServerUnavailableError(url, f"{what}: the server closed the connection")
        return ServerUnavailableError(
            url, f"{what}: the answer is not HTTP/1.1 (is this the gRPC port? use protocol 'grpc')", retryable=False
        )
    if isinstance(exc, TimeoutError):
        return ServerUnavailableError(url, f"{what}: no answer before the deadline", retryable=False)
    if isinstance(exc, OSError):  # refused, reset, broken pipe, no route
        return ServerUnavailableError(url, f"{what}: {exc.strerror or exc}")
    return InferenceError(f"{what} on {url!r} ({protocol}) failed: {type(exc).__name__}: {exc}")


def _gave_up(last: ClientError, attempts: int, servers: int) -> ClientError:
    """`last` with the retries in its message, so the one CLI line says they happened."""
    note = f" (gave up after {attempts} attempts on {servers} server{'s' if servers > 1 else ''})"
    if attempts == 1:
        return last
    if isinstance(last, ServerUnavailableError):
        return ServerUnavailableError(last.url, last.detail + note, retryable=last.retryable)
    return type(last)(f"{last}{note}")


class Endpoints:
    """Round-robin over server URLs, skipping for `cooldown_s` those that just failed (thread-safe).

    Each call gets every URL once, starting one further than the previous call: requests
    spread evenly, and a failed server is tried last until its cooldown ends, so a stopped
    replica costs at most one failed attempt per cooldown instead of one per request.
    """

    def __init__(self, urls: Sequence[str], cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = list(urls)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._next = 0
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """This call's URLs: the next in turn first, servers in cooldown moved to the end."""
        with self._lock:
            start, self._next = self._next, (self._next + 1) % len(self.urls)
            now = self._clock()
            turn = self.urls[start:] + self.urls[:start]
            return sorted(turn, key=lambda url: self._down_until.get(url, 0.0) > now)

    def failed(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = self._clock() + self.cooldown_s

    def succeeded(self, url: str) -> None:
        with self._lock:
            self._down_until.pop(url, None)


def call_with_retries(
    attempt: Callable[[str, float], T],
    endpoints: Endpoints,
    policy: RetryPolicy,
    timeout_s: float,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run `attempt(url, seconds_left)` until it succeeds, a non-retryable error, or the policy/deadline ends.

    `attempt` must raise only `ClientError`s (see `translate`); the last one is raised.
    """
    rng = rng or random.Random()
    deadline = clock() + timeout_s
    order = endpoints.order()
    last: ClientError | None = None
    tries = 0
    for tries in range(1, policy.attempts + 1):
        url = order[(tries - 1) % len(order)]
        try:
            result = attempt(url, max(deadline - clock(), 0.001))
        except ClientError as exc:
            if not exc.retryable:
                raise _gave_up(exc, tries, len(order)) from None
            endpoints.failed(url)
            last = exc
        else:
            endpoints.succeeded(url)
            return result
        if tries == policy.attempts:
            break
        if tries % len(order) == 0:  # every server failed this round: back off before the next
            pause = policy.backoff_s(tries // len(order), rng)
            if clock() + pause >= deadline:
                break
            sleep(pause)
        elif clock() >= deadline:
            break
    assert last is not None
    raise _gave_up(last, tries, len(order)) from None
