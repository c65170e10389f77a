"""neco.app: `neco app`, the in-context segmentation web page (the `app` extra).

A stage of its own on top of the client's public API: `neco.app.server` (FastAPI, imported
only to run the page), `neco.app.cli` and `neco.app.config` (both FastAPI-free, so `neco --help`
and config validation work in a client-only install), `neco.app.inputs` (what an upload may be)
and `neco.app.page` (the HTML).
"""
