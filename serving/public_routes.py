"""The Triton routes the gateway serves on the public ports: inference, health and model metadata only.

Why an allow-list: behind the gateway, tritonserver also serves its admin APIs — the model
repository (index, load, unload: loading accepts a python model uploaded in the request, which
then runs as the server's user), shared-memory registration (makes tritonserver map and write
`/dev/shm` objects it can open), statistics, trace and log settings. None of them is for a
client, and Triton's own guard for them (a restricted-API key) would have to sit on its command
line (`neco.serving.pytriton_compat`). So the gateway forwards only what a client of the model
uses and answers everything else itself, whatever headers the caller sends; a route added to a
later Triton stays closed until it is listed here.
"""

from __future__ import annotations

import re

_SERVICE = "/inference.GRPCInferenceService/"
PUBLIC_GRPC_METHODS = frozenset(
    _SERVICE + name
    for name in (
        "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig",
        "ModelInfer", "ModelStreamInfer",
    )
)  # fmt: skip
"""Everything else of the service (Repository*, *SharedMemory*, ModelStatistics, TraceSetting,
LogSettings) is answered UNIMPLEMENTED by the gateway."""
_PUBLIC_HTTP = re.compile(
    r"/v2(/health/(live|ready)|/models/(?!stats\Z)[^/]+(/versions/[0-9]+)?(/ready|/config|/infer)?)?"
)
"""Server metadata, health, and per model: metadata, readiness, config, inference (`/v2/models/stats` is
Triton's statistics of every model, not a model named `stats`)."""
REFUSED = "this route is not served through the gateway (only inference, health and model metadata are)"


def is_public_http(path: str) -> bool:
    """True if the gateway forwards an HTTP request for `path` (the decoded path it forwards)."""
    return _PUBLIC_HTTP.fullmatch(path) is not None
