"""The page's HTTP edge: bounded bodies, multipart forms parsed in memory, validated fields, one-line errors.

A body over `max_upload_mb` is refused before anything parses it (`BodyLimit`); a body within
it is parsed by starlette's multipart parser with every file kept in memory, so an upload is
never written to a temporary file. Form fields are validated by a pydantic model.
"""

from __future__ import annotations

from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neco.app.config import MAX_TEMPERATURE, MIB, MIN_TEMPERATURE, AppConfig
from neco.app.inputs import FormError, Upload
from neco.client.upsample import DEFAULT_UPSAMPLE
from neco.contract import registered_patch_sizes

MAX_SIZE = 4096
"""Largest encoder size the form takes; the backend's own limits refuse large inputs with a message."""


class InvalidFormError(FormError):
    """A form field of the wrong type or out of range (answered 422, like FastAPI's own checks)."""


def one_line(exc: BaseException | str) -> str:
    """The message as one line (multi-line config errors joined), bounded in length."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def error(status: int, message: BaseException | str) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body beyond `max_bytes` is answered 413 before anything parses it.

    The declared Content-Length is checked first; chunked bodies are counted as they arrive,
    and a body within the limit is buffered and replayed to the application.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared) if declared.isdigit() else None)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, None)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        got = f"{size / MIB:.1f} MiB" if size is not None else "more than that"
        message = f"upload too large: {got}; the limit is {self.max_bytes / MIB:.1f} MiB (max_upload_mb)"
        await error(413, message)(scope, receive, send)


class InMemoryMultiPartParser(MultiPartParser):
    """starlette's multipart parser with every file kept in memory, never in a temporary file.

    A `SpooledTemporaryFile` with `max_size=0` never rolls over to disk; memory stays bounded
    because `BodyLimit` has already refused any body over `max_upload_mb`.
    """

    spool_max_size = 0


class SegmentForm(BaseModel):
    """The plain fields of `POST /api/segment` (files are read separately)."""

    bank: str = ""
    classes: str = ""
    colours: str = ""
    size: int | None = Field(default=None, ge=min(registered_patch_sizes()), le=MAX_SIZE)  # one patch at least
    """Encoder input size (shorter side, px); empty = the bank's policy or the support images' own size."""
    k: int = Field(ge=1, le=1024)
    temperature: float = Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    upsample: Literal["guided", "bilinear"] = DEFAULT_UPSAMPLE
    """Patch scores to pixels: guided by the query's edges (segment()'s default) or bilinear."""


async def read_form(request: Request) -> FormData:
    """The request's multipart form, parsed in memory; a malformed one is a one-line 400."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise FormError("send the form as multipart/form-data with a query image file")
    try:
        return await InMemoryMultiPartParser(request.headers, request.stream()).parse()
    except MultiPartException as exc:
        raise FormError(f"malformed form: {exc.message}") from None


def form_fields(form: FormData, config: AppConfig) -> SegmentForm:
    """Validated text fields; an empty field (a cleared number input) takes the configured default."""
    given = {key: value for key, value in form.multi_items() if isinstance(value, str) and value != ""}
    try:
        return SegmentForm.model_validate({"k": config.k, "temperature": config.temperature, **given})
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors()]
        raise InvalidFormError("invalid form: " + "; ".join(problems)) from None


async def form_files(form: FormData, field: str) -> list[Upload]:
    """The files a form field really carried: browsers send an empty part for an empty file input."""
    chosen = [f for f in form.getlist(field) if isinstance(f, UploadFile) and f.filename]
    return [Upload(f.filename or "", await f.read()) for f in chosen]
