"""`RequestGateway`: the server's public HTTP and gRPC endpoints, in front of tritonserver.

Triton allocates what a request declares before any model code runs (see
`neco.serving.request_check`), and no Triton 2.51 option bounds it. So the embedded server
binds tritonserver to private loopback ports and puts this gateway on the public ones. For each
infer request it reads only the header (JSON, or the ModelInferRequest protobuf), checks the
declared shapes against the data received and the `InputLimits`, answers a bad request itself
(HTTP 400 / gRPC INVALID_ARGUMENT, one line), and forwards the rest byte for byte; only the
routes of `neco.serving.public_routes` (health, metadata, inference) are forwarded at all.
Bodies above what the limits allow are cut off while they are read (HTTP 413 /
RESOURCE_EXHAUSTED), so memory stays bounded. While tritonserver is down or restarting (the
embedded server says so through `set_available`), it answers 503 / UNAVAILABLE, which clients
retry and which keeps readiness honest; liveness stays 200 while it recovers. A caller that
goes away cancels its forwarded call (gRPC cancellation; the HTTP handler is cancelled too).

Bodies are read by `neco.serving.bodies.BodyReader` under a deadline and a cap on the bytes held
over all connections, and large JSON headers are parsed on a worker thread, a bounded number at
a time, so readiness and gRPC keep answering. What the gateway cannot read exactly as Triton does is refused (`_SINGLE_HEADERS`,
`neco.serving.request_check.parse_header`).

Both servers share one asyncio loop on a daemon thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from aiohttp import ClientConnectionError, ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.http_exceptions import HttpProcessingError
from tritonclient.grpc import service_pb2

from neco.errors import NecoError
from neco.serving.bodies import BodyReader, BodyRefused
from neco.serving.config import BodyLimits
from neco.serving.public_routes import PUBLIC_GRPC_METHODS, REFUSED, is_public_http
from neco.serving.request_check import (
    HEADER_ALLOWANCE,
    JSON_CHARS_PER_ELEMENT,
    RequestRefused,
    grpc_inputs,
    header_size,
    http_inputs,
    request_byte_budget,
    request_problem,
)
from neco.signature import InputLimits

LOGGER = logging.getLogger(__name__)


class _OneLineProtocolErrors(logging.Filter):
    """aiohttp logs a full traceback when a client speaks another protocol (gRPC's HTTP/2, TLS) to the
    HTTP port; the server is fine and the traceback says nothing useful, so it becomes one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "not an HTTP/1.x request on the HTTP port (%s); gRPC clients use the gRPC port",
                (type(error).__name__,),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("aiohttp.server").addFilter(_OneLineProtocolErrors())
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_CHECKED = {GRPC_SERVICE + "ModelInfer"}
GRPC_STREAM = GRPC_SERVICE + "ModelStreamInfer"
UNAVAILABLE = "model server unavailable (starting or restarting); retry"
_HOP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)
_NOT_ADDED = ("Accept-Encoding", "User-Agent", "Content-Type")  # forwarded only when the client sent them
_ANSWER_DROPPED = _HOP_HEADERS - {"content-encoding"}  # a compressed answer keeps its encoding
_SINGLE_HEADERS = (
    "Content-Length", "Transfer-Encoding", "Content-Encoding", "Content-Type", "Host",
    "Inference-Header-Content-Length",
)  # fmt: skip
"""Headers refused when repeated: the gateway reads the first, Triton's HTTP server the last."""
_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class GatewayError(NecoError, RuntimeError):
    """The gateway could not bind its ports."""


def _is_infer(path: str) -> bool:
    parts = path.strip("/").split("/")
    return len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] == "infer"


def _is_generate(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1] in ("generate", "generate_stream")


class _Upstream:
    """Whether tritonserver is up: set by the embedded server, read by both proxies.

    Not inferred from connections: a tritonserver that is shutting down still answers
    `ready` on a kept-alive connection, so only its owner can say when it is gone.
    """

    def __init__(self) -> None:
        self.available = False


class _Parsers:
    """Worker threads for large request headers (JSON or protobuf), a bounded number at a time.

    json.loads and protobuf parsing hold the GIL while they scan, so a worker thread does not
    let the loop run during one parse; it lets it run between parses (readiness waited for
    every queued parse before), and `slots` bounds how many run at once, each costing about
    three times its body. A slot is freed when its parse ends, even if the caller went away.
    """

    def __init__(self, settings: BodyLimits):
        self.threshold = settings.large_body_bytes
        self.pool = ThreadPoolExecutor(settings.max_large_bodies, thread_name_prefix="neco-gateway-parse")
        self.slots = asyncio.Semaphore(settings.max_large_bodies)

    async def run(self, size: int, check: Callable[[], str | None]) -> str | None:
        """`check()`, on the loop for a header below the threshold, else on a worker thread."""
        if size < self.threshold:
            return check()
        loop = asyncio.get_running_loop()

        def free(_: object) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.slots.release)

        await self.slots.acquire()
        job = self.pool.submit(check)
        job.add_done_callback(free)
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _HttpProxy:
    """Checks infer bodies, refuses Triton's generate extension, forwards the rest unchanged.

    What Triton would read differently is refused, not normalised: repeated headers from
    `_SINGLE_HEADERS`, and JSON objects with a repeated key (`parse_header`). The other way, a
    body re-serialised from what was checked, was not taken: it would re-encode up to 120 MB
    per request on the loop, and every field the gateway does not model (parameters, outputs,
    numbers) would still reach Triton through a second serialiser. Refusing keeps the forwarded
    bytes exactly the bytes checked.
    """

    def __init__(
        self,
        upstream: str,
        limits: InputLimits,
        patch_size: int | None,
        state: _Upstream,
        settings: BodyLimits,
        parsers: _Parsers,
    ):
        self.upstream, self.limits, self.patch_size = upstream, limits, patch_size
        self.state, self.settings, self.parsers = state, settings, parsers
        self.session: ClientSession | None = None
        self.bodies: BodyReader | None = None

    async def open(self, max_body: int) -> None:
        too_large = (f"request body exceeds {max_body} bytes, the most the server's limits allow "
                     f"(max_request_pixels={self.limits.max_request_pixels})")  # fmt: skip
        self.bodies = BodyReader(max_body, too_large, self.settings)
        # auto_decompress off: a compressed answer is passed on with its Content-Encoding.
        # No automatic headers: aiohttp would otherwise ask for gzip on the client's behalf, and
        # Triton compressing a 3 MB feature map cost ~110 ms per 8-image request.
        self.session = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
            skip_auto_headers=_NOT_ADDED,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        repeated = [name for name in _SINGLE_HEADERS if len(request.headers.getall(name, ())) > 1]
        if repeated:
            return self._error(400, f"the {repeated[0]} header is repeated")
        assert self.bodies is not None
        try:
            async with self.bodies.holding(request) as body:
                return await self._answer(request, body)
        except BodyRefused as exc:
            answer = self._error(exc.status, str(exc))
            if exc.status != 408:
                return answer  # aiohttp drains (and drops) the rest of the body, then the client reads the answer
            await answer.prepare(request)
            await answer.write_eof()
            request.protocol.force_close()  # a body that stalled is not drained for lingering_time more
            return answer

    async def _problem(self, body: bytearray, header_length: str | None) -> str | None:
        """Why the infer body is refused, or None (a large JSON header is parsed on a worker thread)."""

        def check() -> str | None:
            try:
                return request_problem(http_inputs(body, header_length, self.limits, self.patch_size))
            except RequestRefused as exc:
                return str(exc)

        return await self.parsers.run(header_size(len(body), header_length), check)

    async def _answer(self, request: web.Request, body: bytearray) -> web.StreamResponse:
        if not self.state.available:
            if request.path.rstrip("/") == "/v2/health/live":
                return web.Response(status=200)  # alive and recovering; readiness says it is not serving
            return self._error(503, UNAVAILABLE)
        if request.method == "POST" and _is_generate(request.path):
            return self._error(404, "the generate extension is not served by this model")
        if not is_public_http(request.path):
            return self._error(403, REFUSED)
        if request.method == "POST" and _is_infer(request.path):
            problem = await self._problem(body, request.headers.get("Inference-Header-Content-Length"))
            if problem is not None:
                return self._error(400, problem)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        assert self.session is not None
        try:
            async with self.session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as answer:
                payload = await answer.read()
                kept = {k: v for k, v in answer.headers.items() if k.lower() not in _ANSWER_DROPPED}
                return web.Response(status=answer.status, body=payload, headers=kept)
        except ClientConnectionError:
            return self._error(503, UNAVAILABLE)


class _GrpcProxy(grpc.GenericRpcHandler):
    """Forwards every GRPCInferenceService method as raw bytes; ModelInfer messages are checked first."""

    def __init__(self, upstream: str, limits: InputLimits, patch_size: int | None, state: _Upstream, parsers: _Parsers):
        self.upstream, self.limits, self.patch_size, self.state, self.parsers = (
            upstream, limits, patch_size, state, parsers,
        )  # fmt: skip
        self.channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.upstream, options=_UNLIMITED)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def _check(self, message: bytes) -> str | None:
        try:
            request = service_pb2.ModelInferRequest.FromString(message)
            return request_problem(grpc_inputs(request, self.limits, self.patch_size))
        except RequestRefused as exc:
            return str(exc)
        except Exception as exc:  # a protobuf that does not parse  # noqa: BLE001
            return f"malformed ModelInferRequest: {type(exc).__name__}"

    async def _problem(self, message: bytes) -> str | None:
        return await self.parsers.run(len(message), lambda: self._check(message))

    @staticmethod
    def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str | bytes]]:
        return [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith((":", "grpc-"))]

    def _unary(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def forward(message: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if not self.state.available:
                await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE)
            if method in GRPC_CHECKED:
                problem = await self._problem(message)
                if problem is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            assert self.channel is not None
            call = self.channel.unary_unary(method)
            try:
                return await call(message, timeout=context.time_remaining(), metadata=self._metadata(context))
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")  # raises: the caller sees Triton's status

        return forward

    def _stream(self) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        async def forward(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async def checked() -> AsyncIterator[bytes]:
                async for message in messages:
                    problem = await self._problem(message)
                    if problem is not None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                    yield message

            if not self.state.available:
                await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE)
            assert self.channel is not None
            call = self.channel.stream_stream(GRPC_STREAM)(
                checked(), timeout=context.time_remaining(), metadata=self._metadata(context)
            )
            try:
                async for answer in call:
                    yield answer
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return forward

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in PUBLIC_GRPC_METHODS:
            return None  # UNIMPLEMENTED: admin methods are never forwarded (neco.serving.public_routes)
        if method == GRPC_STREAM:
            return grpc.stream_stream_rpc_method_handler(self._stream())
        return grpc.unary_unary_rpc_method_handler(self._unary(method))


class RequestGateway:
    """Public HTTP + gRPC endpoints that check requests, forwarding to tritonserver's private ports."""

    def __init__(
        self,
        host: str,
        ports: tuple[int, int],
        upstream_ports: tuple[int, int],
        limits: InputLimits,
        upstream_host: str = "127.0.0.1",
        bodies: BodyLimits | None = None,
        patch_size: int | None = None,
    ):
        """`patch_size`: the served model's (image sides must be its multiples); None (a gateway that does
        not know the model) refuses only sides that suit no registered patch size."""
        self.host, self.ports, self.limits = host, ports, limits
        self._state, settings = _Upstream(), bodies or BodyLimits()
        self._parsers = _Parsers(settings)
        self._http = _HttpProxy(
            f"http://{upstream_host}:{upstream_ports[0]}", limits, patch_size, self._state, settings, self._parsers
        )
        self._grpc = _GrpcProxy(f"{upstream_host}:{upstream_ports[1]}", limits, patch_size, self._state, self._parsers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="neco-gateway", daemon=True)
        self._runner: web.AppRunner | None = None
        self._server: grpc.aio.Server | None = None
        self._bound = (0, 0)

    def set_available(self, available: bool) -> None:
        """Forward requests (True) or answer 503 / UNAVAILABLE while tritonserver is down (False)."""
        self._state.available = available

    def start(self) -> RequestGateway:
        """Bind both public ports (GatewayError when one is taken) and start forwarding."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    async def _start(self) -> None:
        budget = request_byte_budget(self.limits)
        max_body = budget * JSON_CHARS_PER_ELEMENT + HEADER_ALLOWANCE
        app = web.Application()  # bodies are read by _Bodies, which enforces max_body
        app.router.add_route("*", "/{tail:.*}", self._http.handle)
        await self._http.open(max_body)
        await self._grpc.open()
        # auto_decompress off: _Bodies decompresses step by step and stops at max_body.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.ports[0])
        try:
            await site.start()
        except OSError as exc:
            raise GatewayError(
                f"cannot serve HTTP on {self.host}:{self.ports[0]}: port in use ({exc.strerror})"
            ) from None
        options = [("grpc.max_receive_message_length", budget + HEADER_ALLOWANCE), ("grpc.max_send_message_length", -1)]
        self._server = grpc.aio.server(handlers=[self._grpc], options=options)
        try:
            bound = self._server.add_insecure_port(f"{self.host}:{self.ports[1]}")
        except RuntimeError:
            bound = 0
        if not bound:
            raise GatewayError(f"cannot serve gRPC on {self.host}:{self.ports[1]}: port in use")
        await self._server.start()
        self._bound = (site._server.sockets[0].getsockname()[1], bound)  # type: ignore[union-attr]  # noqa: SLF001

    @property
    def bound_ports(self) -> tuple[int, int]:
        """The HTTP and gRPC ports actually bound (port 0 resolved)."""
        return self._bound

    def stop(self) -> None:
        """Close both endpoints and the loop; safe to call twice."""
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1)
        if self._runner is not None:
            await self._runner.cleanup()
        await self._http.close()
        await self._grpc.close()
        self._parsers.close()
