"""`neco app`: a small web page for in-context segmentation against a running Triton server.

    GET  /              the page (plain HTML + JS, `neco.app.page.PAGE`)
    GET  /api/config    limits and defaults the page shows
    GET  /api/banks     saved banks under the configured root
    POST /api/segment   multipart: query (file), bank (name) or support (files / zip),
                        classes, k, temperature -> mask PNG, overlay, confidence and PCA maps

Every expected failure is JSON `{"error": "<one line>"}` with a 4xx/5xx status that the page
shows as text; a bug is logged here with its traceback and answered with a one-line 500.
Request bodies are bounded before any parsing (`BodyLimit`) and parsed in memory (uploads are
never written to disk), images are refused from their headers beyond the pixel limits, banks
beyond `max_classes`, and the page binds to 127.0.0.1 unless told otherwise. Needs the `app` extra.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from neco.app.config import AppConfig
from neco.app.forms import BodyLimit, InvalidFormError, SegmentForm, error, form_fields, form_files, read_form
from neco.app.inputs import (
    FormError,
    PixelBudget,
    UnknownBankError,
    Upload,
    UploadTooLargeError,
    bank_folder,
    check_class_count,
    check_label_transfer,
    decode,
    inferred_class_count,
    list_banks,
    parse_class_names,
    support_pairs,
)
from neco.app.page import PAGE
from neco.client import (
    BankError,
    ContractError,
    FeatureBackend,
    MemoryBank,
    batch_features,
    features_to_rgb,
    overlay,
)
from neco.client.backend import prepare_for
from neco.client.errors import (
    BankContractError,
    EndpointError,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from neco.client.images import resize_mask
from neco.client.render import heatmap_overlay, palette
from neco.client.retrieval import SegmentationResult, check_contract, segment_features
from neco.client.upsample import DEFAULT_UPSAMPLE
from neco.errors import NecoError

log = logging.getLogger("neco.app")
Connect = Callable[[], FeatureBackend]
"""Makes the feature backend on first use (a `NecoClient`; tests pass another backend)."""


def status_of(exc: Exception) -> int:
    """The HTTP status of an expected error: the caller's input is 4xx, the server's state 5xx."""
    if isinstance(exc, UploadTooLargeError):
        return 413
    if isinstance(exc, InvalidFormError):
        return 422
    if isinstance(exc, UnknownBankError):
        return 404
    if isinstance(exc, BankContractError):
        return 409
    if isinstance(exc, (ServerUnavailableError, ModelNotReadyError, EndpointError)):
        return 503
    if isinstance(exc, (ModelNotFoundError, InferenceError, ContractError)):
        return 502
    return 400


class Segmenter:
    """The backend (connected on first use), saved banks (a small cache) and one segmentation.

    Requests are served one at a time: a segmentation is CPU-bound numpy and faiss work plus
    one inference, and a lock keeps the bank cache and the backend free of races.
    """

    def __init__(self, config: AppConfig, connect: Connect) -> None:
        self.config = config
        self._connect = connect
        self._backend: FeatureBackend | None = None
        self._banks: OrderedDict[str, tuple[tuple[int, int], MemoryBank]] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def backend(self) -> FeatureBackend:
        if self._backend is None:
            self._backend = self._connect()
        return self._backend

    def saved_bank(self, name: str) -> MemoryBank:
        """Bank `name`, loaded (and checksummed) again only when it was rewritten.

        A bank is written by publishing a whole new folder in its place, so the folder's inode
        and mtime change with every write. Errors name the bank, never the server's path to it.
        """
        folder = bank_folder(self.config.banks, name)
        status = folder.stat()
        stamp = (status.st_ino, status.st_mtime_ns)
        cached = self._banks.get(name)
        if cached is not None and cached[0] == stamp:
            self._banks.move_to_end(name)
            return cached[1]
        contract = self.backend.contract
        try:
            bank = MemoryBank.load(folder, contract=contract)
        except BankError as exc:
            raise type(exc)(without_path(str(exc), folder, name)) from None
        check_class_count(len(bank.class_names), self.config.max_classes, f"bank {name!r}")
        if self.config.bank_cache > 0:
            self._banks[name] = (stamp, bank)
            while len(self._banks) > self.config.bank_cache:
                self._banks.popitem(last=False)
        return bank

    def uploaded_bank(self, uploads: list[Upload], classes: str, budget: PixelBudget) -> MemoryBank:
        config = self.config
        typed = parse_class_names(classes)
        if typed is not None:
            check_class_count(len(typed), config.max_classes, "the class list")
        pairs, listed = support_pairs(uploads, config.max_support_images, config.max_unpacked_bytes, budget)
        names = typed or listed
        count = len(names) if names else inferred_class_count([mask for _, mask in pairs])
        check_class_count(count, config.max_classes, "the support set")
        return MemoryBank.build(self.backend, pairs, class_names=names, image_size=config.size)

    def segment(self, query: Upload, bank: MemoryBank, k: int, temperature: float) -> dict[str, Any]:
        """What `client.segment(query, bank)` computes, plus the pictures the page shows."""
        backend = self.backend
        check_contract(backend.contract, bank)
        rgb = decode(query, "query image", self.config.max_image_pixels)
        prepared = prepare_for(backend, rgb, bank.image_size)  # within the backend's own limits
        patches = prepared.grid[0] * prepared.grid[1]
        check_label_transfer(patches, k, len(bank.class_names), self.config.max_transfer_bytes)
        features = batch_features(backend, [prepared.array])[0]
        result = segment_features(
            features, bank, prepared.original_size, k=k, temperature=temperature, upsample=DEFAULT_UPSAMPLE, guide=rgb
        )  # as segment() does; the page does not offer the choice yet
        colours = palette(len(result.class_names))
        labels, counts = np.unique(result.mask, return_counts=True)
        return {
            "mask": png_data_url(result.mask_image()),
            **previews(rgb, result, features),
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


PREVIEW_SIDE = 1024
"""Longest side of the overlay, confidence and PCA pictures: the page shows them at most that wide,
and blending colours costs tens of bytes per pixel. The mask PNG keeps the query's full size."""


def previews(rgb: np.ndarray, result: SegmentationResult, features: np.ndarray) -> dict[str, str]:
    """The overlay, confidence and PCA pictures, shrunk to `PREVIEW_SIDE` for large queries."""
    height, width = result.mask.shape
    scale = min(1.0, PREVIEW_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    mask, confidence = result.mask, result.confidence
    if size != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.Resampling.BILINEAR))
        mask = resize_mask(mask, size)
        confidence = np.asarray(Image.fromarray(confidence).resize(size[::-1], Image.Resampling.BILINEAR))
    return {
        "overlay": png_data_url(overlay(rgb, mask, result.class_names)),
        "confidence": png_data_url(heatmap_overlay(rgb, confidence, value_range=(0.0, 1.0), label="conf")),
        "pca": png_data_url(features_to_rgb(features, size=size)),
    }


def without_path(message: str, folder: Path, name: str) -> str:
    """`message` with the server's path to a bank replaced by the bank's name."""
    for path in (str(folder.resolve()), str(folder)):
        message = message.replace(path, name)
    return message


def png_data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(config: AppConfig, connect: Connect | None = None) -> FastAPI:
    """The page's ASGI application; `connect` defaults to a `NecoClient` built from `config`."""
    segmenter = Segmenter(config, connect or (lambda: connect_client(config)))
    app = FastAPI(title="NeCo in-context segmentation", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    app.state.segmenter = segmenter

    @app.exception_handler(NecoError)
    async def expected(_request: Request, exc: NecoError) -> JSONResponse:
        return error(status_of(exc), exc)

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
    async def segment(request: Request) -> dict[str, Any]:
        form = await read_form(request)
        try:
            fields = form_fields(form, config)
            queries = await form_files(form, "query")
            supports = await form_files(form, "support")
        finally:
            await form.close()
        if not queries:
            raise FormError("choose a query image to segment")
        if bool(fields.bank) == bool(supports):
            raise FormError("choose a saved bank or upload support images with masks (not both)")
        return await run_in_threadpool(run_segmentation, segmenter, fields, queries[0], supports)

    return app


def run_segmentation(segmenter: Segmenter, fields: SegmentForm, query: Upload, supports: list[Upload]) -> dict:
    """One request's work, off the event loop: the query's pixels are charged first, then the support set's."""
    config = segmenter.config
    budget = PixelBudget(config.max_image_pixels, config.max_request_pixels)
    budget.charge(query, "query image")
    with segmenter.lock:
        if fields.bank:
            memory = segmenter.saved_bank(fields.bank)
        else:
            memory = segmenter.uploaded_bank(supports, fields.classes, budget)
        result = segmenter.segment(query, memory, fields.k, fields.temperature)
    result["bank"] = fields.bank or f"uploaded support set ({memory.num_images} images)"
    return result


def connect_client(config: AppConfig) -> FeatureBackend:
    from neco.client import NecoClient

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
