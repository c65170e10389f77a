"""neco.serving: the embedded (PyTriton) Triton server and the docker compose deployment.

`EmbeddedServer`, `ServeConfig` and `ServingError` are imported lazily so that importing
`neco.serving.cli` (done by every `neco` invocation) never loads pytriton or onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EmbeddedServer", "ServeConfig", "ServingError"]


def __getattr__(name: str) -> Any:
    if name == "ServeConfig":
        from neco.serving.config import ServeConfig

        return ServeConfig
    if name in ("EmbeddedServer", "ServingError"):
        from neco.serving import embedded

        return getattr(embedded, name)
    raise AttributeError(f"module 'neco.serving' has no attribute {name!r}")
