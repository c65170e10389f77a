"""`neco app`: the in-context segmentation page and its JSON API, against a running Triton server.

    GET  /                      the page (`neco.app.page`), its scripts `paint.js` and `page.js`
    GET  /api/config            limits, defaults and the class palette the page shows
    GET  /api/banks             saved banks under the configured root
    GET  /api/banks/NAME.zip    a saved bank's folder as a zip (load it again from Python or `neco segment`)
    GET  /api/bank/TOKEN.zip    a bank the page built from painted supports, as a zip
    GET  /api/examples          clickable examples (generated scenes, `--examples DIR`) and their PNGs
    POST /api/segment           multipart: query (files), bank (name) or support (files / zip), classes,
                                colours, size, k, temperature -> per query: mask PNG, overlay, confidence, PCA

Every expected failure is JSON `{"error": "<one line>"}` with a 4xx/5xx status that the page
shows as text; a bug is logged here with its traceback and answered with a one-line 500.
Request bodies are bounded before any parsing (`BodyLimit`) and parsed in memory (uploads are
never written to disk), images are refused from their headers beyond the pixel limits, banks
beyond `max_classes`, and the page binds to 127.0.0.1 unless told otherwise. Needs the `app` extra.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from neco.app.config import AppConfig
from neco.app.examples import Example, folder_examples, scene_examples
from neco.app.forms import BodyLimit, InvalidFormError, SegmentForm, error, form_fields, form_files, read_form
from neco.app.inputs import (
    FormError,
    PixelBudget,
    UnknownBankError,
    Upload,
    UploadTooLargeError,
    bank_folder,
    list_banks,
)
from neco.app.page import PAGE
from neco.app.painter import PAINTER
from neco.app.script import SCRIPT
from neco.app.segmenter import Connect, Segmenter, class_colours, policy_text, zip_folder
from neco.client import ContractError, FeatureBackend
from neco.client.errors import (
    BankContractError,
    EndpointError,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from neco.errors import NecoError

log = logging.getLogger("neco.app")
PAGE_COLOURS = (
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2", "#eeca3b", "#72b7b2", "#ff9da6", "#9d755d", "#bab0ac",
)  # fmt: skip
"""Class colours the page offers before the user picks their own: bright enough to read over photos.
The page sends them with every painted support, so the overlay and its one legend use them too."""


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


def create_app(config: AppConfig, connect: Connect | None = None) -> FastAPI:
    """The page's ASGI application; `connect` defaults to a `NecoClient` built from `config`."""
    segmenter = Segmenter(config, connect or (lambda: connect_client(config)))
    examples = {e.id: e for e in scene_examples()}
    if config.examples is not None:
        examples.update((e.id, e) for e in folder_examples(config.examples, config.max_image_pixels))
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

    @app.get("/paint.js")
    def painter() -> Response:
        return Response(PAINTER, media_type="text/javascript")

    @app.get("/page.js")
    def script() -> Response:
        return Response(SCRIPT, media_type="text/javascript")

    @app.get("/api/config")
    def settings() -> dict[str, Any]:
        return {
            "max_upload_bytes": config.max_upload_bytes,
            "max_support_images": config.max_support_images,
            "max_queries": config.max_queries,
            "k": config.k,
            "temperature": config.temperature,
            "size": config.size,
            "palette": list(PAGE_COLOURS),
        }

    @app.get("/api/banks")
    def banks() -> dict[str, Any]:
        return {"root": str(config.banks), "banks": list_banks(config.banks)}

    @app.get("/api/banks/{name}.zip")
    def saved_bank_zip(name: str) -> Response:
        folder = bank_folder(config.banks, name)
        return zip_response(zip_folder(folder, name), name)

    @app.get("/api/bank/{token}.zip")
    def built_bank_zip(token: str) -> Response:
        with segmenter.lock:
            data = segmenter.built_bank_zip(token)
        if data is None:
            raise UnknownBankError("that bank is no longer kept by the page: segment again to build it anew")
        return zip_response(data, "bank")

    @app.get("/api/examples")
    def example_list() -> dict[str, Any]:
        return {"examples": [e.describe() for e in examples.values()]}

    @app.get("/api/examples/{example}/support.png")
    def example_support(example: str) -> Response:
        return Response(find_example(examples, example).support, media_type="image/png")

    @app.get("/api/examples/{example}/query/{index}.png")
    def example_query(example: str, index: int) -> Response:
        queries = find_example(examples, example).queries
        if not 0 <= index < len(queries):
            raise HTTPException(404, f"example {example!r} has {len(queries)} query images")
        return Response(queries[index], media_type="image/png")

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
        if len(queries) > config.max_queries:
            raise UploadTooLargeError(
                f"{len(queries)} query images; the page segments at most {config.max_queries} at once (max_queries)"
            )
        if bool(fields.bank) == bool(supports):
            raise FormError("choose a saved bank or paint (or upload) support images with masks (not both)")
        return await run_in_threadpool(run_segmentation, segmenter, fields, queries, supports)

    return app


def find_example(examples: dict[str, Example], name: str) -> Example:
    if name not in examples:
        raise HTTPException(404, f"there is no example named {name[:80]!r}")
    return examples[name]


def zip_response(data: bytes, name: str) -> Response:
    return Response(
        data, media_type="application/zip", headers={"content-disposition": f'attachment; filename="{name}.zip"'}
    )


def run_segmentation(
    segmenter: Segmenter, fields: SegmentForm, queries: list[Upload], supports: list[Upload]
) -> dict[str, Any]:
    """One request's work, off the event loop: the queries' pixels are charged first, then the support set's."""
    config = segmenter.config
    budget = PixelBudget(config.max_image_pixels, config.max_request_pixels)
    for query in queries:
        budget.charge(query, "query image")
    with segmenter.lock:
        if fields.bank:
            bank = segmenter.named_bank(fields.bank, fields.size)
        else:
            bank = segmenter.uploaded_bank(supports, fields.classes, fields.size, budget)
        colours = class_colours(fields.colours, len(bank.memory.class_names))
        results = [segmenter.segment(q, bank, fields.k, fields.temperature, colours, fields.upsample) for q in queries]
    memory = bank.memory
    return {
        "bank": {
            "label": bank.label,
            "download": bank.download,
            "classes": memory.class_names,
            "images": memory.num_images,
            "patches": len(memory),
            "policy": policy_text(memory.image_size),
            "support_side": bank.support_side,
        },
        "k": fields.k,
        "temperature": fields.temperature,
        "upsample": fields.upsample,
        "results": results,
    }


def connect_client(config: AppConfig) -> FeatureBackend:
    from neco.client import NecoClient

    sized = {"size": config.size} if config.size is not None else {}
    return NecoClient(config.url, protocol=config.protocol, model=config.model, timeout_s=config.timeout_s, **sized)


def serve(config: AppConfig) -> None:
    """Run the page with uvicorn until Ctrl+C or SIGTERM (the CLI's `neco app`)."""
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
