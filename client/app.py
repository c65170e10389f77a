"""`neco app`: a small web page for in-context segmentation against a running Triton server.

    GET  /              the page (plain HTML + JS, `app_page.PAGE`)
    GET  /api/config    limits and defaults the page shows
    GET  /api/banks     saved banks under the configured root
    POST /api/segment   multipart: query (file), bank (name) or support (files / zip),
                        classes, k, temperature -> mask PNG, overlay, confidence and PCA maps

Every expected failure is JSON `{"error": "<one line>"}` with a 4xx/5xx status that the page
shows as text; a bug is logged here with its traceback and answered with a one-line 500.
Request bodies are bounded before any parsing (`BodyLimit`), uploads are never written to
disk, and the page binds to 127.0.0.1 unless told otherwise. Needs the `app` extra.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neco.errors import NecoError

from .app_config import MIB, AppConfig
from .app_inputs import (
    FormError,
    UnknownBankError,
    Upload,
    UploadTooLargeError,
    bank_folder,
    decode,
    list_banks,
    parse_class_names,
    support_pairs,
)
from .app_page import PAGE
from .backend import FeatureBackend, batch_features
from .bank import MemoryBank
from .bank_io import MANIFEST
from .errors import (
    BankContractError,
    ContractError,
    EndpointError,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from .images import prepare_image
from .render import features_to_rgb, heatmap_overlay, palette
from .retrieval import check_contract, segment_features

log = logging.getLogger("neco.app")
Connect = Callable[[], FeatureBackend]
"""Makes the feature backend on first use (a `NecoClient`; tests pass another backend)."""


def status_of(exc: Exception) -> int:
    """The HTTP status of an expected error: the caller's input is 4xx, the server's state 5xx."""
    if isinstance(exc, UploadTooLargeError):
        return 413
    if isinstance(exc, UnknownBankError):
        return 404
    if isinstance(exc, BankContractError):
        return 409
    if isinstance(exc, (ServerUnavailableError, ModelNotReadyError, EndpointError)):
        return 503
    if isinstance(exc, (ModelNotFoundError, InferenceError, ContractError)):
        return 502
    return 400


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


class Segmenter:
    """The backend (connected on first use), saved banks (a small cache) and one segmentation.

    Requests are served one at a time: a segmentation is CPU-bound numpy and faiss work plus
    one inference, and a lock keeps the bank cache and the backend free of races.
    """

    def __init__(self, config: AppConfig, connect: Connect) -> None:
        self.config = config
        self._connect = connect
        self._backend: FeatureBackend | None = None
        self._banks: OrderedDict[str, tuple[int, MemoryBank]] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def backend(self) -> FeatureBackend:
        if self._backend is None:
            self._backend = self._connect()
        return self._backend

    def saved_bank(self, name: str) -> MemoryBank:
        """Bank `name`, loaded (and checksummed) again only when its manifest changed."""
        folder = bank_folder(self.config.banks, name)
        stamp = (folder / MANIFEST).stat().st_mtime_ns
        cached = self._banks.get(name)
        if cached is not None and cached[0] == stamp:
            self._banks.move_to_end(name)
            return cached[1]
        bank = MemoryBank.load(folder, contract=self.backend.contract)
        if self.config.bank_cache > 0:
            self._banks[name] = (stamp, bank)
            while len(self._banks) > self.config.bank_cache:
                self._banks.popitem(last=False)
        return bank

    def uploaded_bank(self, uploads: list[Upload], classes: str) -> MemoryBank:
        pairs, names = support_pairs(uploads, self.config.max_support_images, self.config.max_unpacked_bytes)
        return MemoryBank.build(
            self.backend, pairs, class_names=parse_class_names(classes) or names, image_size=self.config.size
        )

    def segment(self, query: Upload, bank: MemoryBank, k: int, temperature: float) -> dict[str, Any]:
        """What `client.segment(query, bank)` computes, plus the pictures the page shows."""
        backend = self.backend
        check_contract(backend.contract, bank)
        rgb = decode(query, "query image")
        prepared = prepare_image(rgb, bank.image_size, backend.contract.patch_size)
        features = batch_features(backend, [prepared.array])[0]
        result = segment_features(features, bank, prepared.original_size, k=k, temperature=temperature)
        colours = palette(len(result.class_names))
        labels, counts = np.unique(result.mask, return_counts=True)
        return {
            "mask": png_data_url(result.mask_image()),
            "overlay": png_data_url(result.overlay(rgb)),
            "confidence": png_data_url(heatmap_overlay(rgb, result.confidence, value_range=(0.0, 1.0), label="conf")),
            "pca": png_data_url(features_to_rgb(features, size=prepared.original_size)),
            "legend": [
                {
                    "name": result.class_names[c],
                    "colour": "#" + bytes(colours[c].tolist()).hex(),
                    "share": n / result.mask.size,
                }
                for c, n in zip(labels.tolist(), counts.tolist())
            ],
            "size": list(prepared.original_size),
            "grid": list(prepared.grid),
            "classes": result.class_names,
            "mean_confidence": float(result.confidence.mean()),
        }


def png_data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _uploads(files: list[UploadFile] | None) -> list[Upload]:
    """The files a form really carried: browsers send an empty part for an empty file input."""
    chosen = [f for f in files or [] if f.filename]
    return [Upload(f.filename or "", f.file.read()) for f in chosen]


def create_app(config: AppConfig, connect: Connect | None = None) -> FastAPI:
    """The page's ASGI application; `connect` defaults to a `NecoClient` built from `config`."""
    segmenter = Segmenter(config, connect or (lambda: connect_client(config)))
    app = FastAPI(title="NeCo in-context segmentation", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    app.state.segmenter = segmenter

    @app.exception_handler(NecoError)
    async def expected(_request: Request, exc: NecoError) -> JSONResponse:
        return error(status_of(exc), exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'form'}: {e['msg']}" for e in exc.errors()]
        return error(422, "invalid form: " + "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); the app's log has the details")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/config")
    def settings() -> dict[str, Any]:
        return {
            "max_upload_bytes": config.max_upload_bytes,
            "max_support_images": config.max_support_images,
            "k": config.k,
            "temperature": config.temperature,
        }

    @app.get("/api/banks")
    def banks() -> dict[str, Any]:
        return {"root": str(config.banks), "banks": list_banks(config.banks)}

    @app.post("/api/segment")
    def segment(
        query: UploadFile | None = File(None),
        support: list[UploadFile] | None = File(None),
        bank: str = Form(""),
        classes: str = Form(""),
        k: int = Form(config.k, ge=1, le=1024),
        temperature: float = Form(config.temperature, gt=0, le=100),
    ) -> dict[str, Any]:
        queries = _uploads([query] if query is not None else [])
        if not queries:
            raise FormError("choose a query image to segment")
        supports = _uploads(support)
        if bool(bank) == bool(supports):
            raise FormError("choose a saved bank or upload support images with masks (not both)")
        with segmenter.lock:
            memory = segmenter.saved_bank(bank) if bank else segmenter.uploaded_bank(supports, classes)
            result = segmenter.segment(queries[0], memory, k, temperature)
        result["bank"] = bank or f"uploaded support set ({memory.num_images} images)"
        return result

    return app


def connect_client(config: AppConfig) -> FeatureBackend:
    from .triton import NecoClient

    return NecoClient(
        config.url, protocol=config.protocol, model=config.model, size=config.size, timeout_s=config.timeout_s
    )


def serve(config: AppConfig) -> None:
    """Run the page with uvicorn until Ctrl+C (the CLI's `neco app`)."""
    import uvicorn

    where = config.url or f"the default {config.protocol} port"
    print(
        f"neco app: http://{config.host}:{config.port}/  (Triton {where}, model {config.model}, "
        f"banks under {config.banks}/)",
        flush=True,
    )
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the page has no authentication and is now reachable from other hosts (%s)", config.host)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")
