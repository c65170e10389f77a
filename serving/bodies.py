"""`BodyReader`: how the request gateway reads HTTP request bodies, bounded in time and bytes.

aiohttp's `request.read()` has no deadline and counts nothing across connections, so unfinished
chunked bodies were held until their clients closed (12 x 120 MiB held 2 GB), and its
decompression plus the final copy held about twice the body limit for a gzip bomb. Here each
body has a deadline (408, the connection is then closed), the bytes held by all bodies together
are capped (503, retryable), and compressed bodies are decompressed a step at a time and cut
off at the body limit (413).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator

from aiohttp import web

from neco.errors import InputError
from neco.serving.config import BodyLimits

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""Content-Encodings accepted (those Triton accepts too), as zlib window bits."""
_INFLATE_STEP = 1 << 20
"""Decompressed bytes produced per step, so a bomb never expands far past the body limit."""


class BodyRefused(InputError):
    """A request body the gateway will not hold or read further; answered with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyReader:
    """Reads request bodies: one deadline each, one byte budget for all of them together."""

    def __init__(self, max_body: int, too_large: str, settings: BodyLimits):
        self.max_body, self.too_large, self.deadline = max_body, too_large, settings.read_timeout_s
        self.capacity = max(settings.max_held_bytes, max_body)  # one largest body always fits
        self.held = 0

    @contextlib.asynccontextmanager
    async def holding(self, request: web.Request) -> AsyncIterator[bytearray]:
        """The whole (decompressed) body, counted as held until the block ends; BodyRefused if not."""
        body = bytearray()
        try:
            await asyncio.wait_for(self._fill(request, body), self.deadline)
        except BaseException as exc:
            self.held -= len(body)
            body.clear()  # refused: a traceback cycle through this frame must not keep it until the gc runs
            if isinstance(exc, asyncio.TimeoutError):
                raise BodyRefused(408, f"request body not received within {self.deadline:g} s") from None
            raise
        try:
            yield body
        finally:
            self.held -= len(body)

    def _keep(self, body: bytearray, data: bytes) -> None:
        if len(body) + len(data) > self.max_body:
            raise BodyRefused(413, self.too_large)
        if self.held + len(data) > self.capacity:
            raise BodyRefused(503, "the gateway holds as many request bodies as it may; retry")
        self.held += len(data)
        body += data

    async def _fill(self, request: web.Request, body: bytearray) -> None:
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity":
            if (request.content_length or 0) > self.max_body:
                raise BodyRefused(413, self.too_large)
            async for chunk in request.content.iter_any():
                self._keep(body, chunk)
            return
        if encoding not in _WBITS:
            raise BodyRefused(415, f"Content-Encoding {encoding[:32]!r} is not accepted (gzip, deflate, identity)")
        decoder, received = zlib.decompressobj(_WBITS[encoding]), 0
        try:
            async for chunk in request.content.iter_any():
                received += len(chunk)
                while chunk:  # max_length > 0 always: _keep refused the body once it passed max_body
                    self._keep(body, decoder.decompress(chunk, min(_INFLATE_STEP, self.max_body + 1 - len(body))))
                    chunk = decoder.unconsumed_tail
        except zlib.error:
            raise BodyRefused(400, f"request body is not valid {encoding} data") from None
        if received and (not decoder.eof or decoder.unused_data):  # an empty body stays empty
            raise BodyRefused(400, f"request body is not exactly one complete {encoding} stream")
