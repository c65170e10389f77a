"""neco.app: `neco app`, the in-context segmentation web page (the `app` extra).

A stage of its own on top of the client's public API: `neco.app.server` (the FastAPI
application, imported only to run the page), `neco.app.forms` (bounded bodies, in-memory
multipart forms), `neco.app.inputs` (what an upload may be and cost), `neco.app.page` (the HTML),
and `neco.app.cli` / `neco.app.config`, both FastAPI-free so that `neco --help` and config
validation work in a client-only install.
"""
