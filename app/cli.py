"""`neco app`: serve the in-context segmentation page (extra `app`); torch- and FastAPI-free at import.

neco app [--config configs/app.yaml] [--url HOST:PORT] [--transport grpc|http] [--banks DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
from typing import Any

from neco.app.config import AppConfig
from neco.cli import deprecated_alias
from neco.errors import MissingExtraError

APP_MODULES = ("fastapi", "uvicorn", "multipart")
"""What `neco.app.server` needs beyond the client extra: FastAPI, uvicorn, python-multipart.

Checked up front because starlette imports python-multipart optionally and would fail only on
the first form it parses, with an assertion rather than an error naming the extra."""


def register(subparsers: Any) -> None:
    """Add the `app` sub-command to the `neco` console script."""
    defaults = AppConfig()
    parser = subparsers.add_parser(
        "app",
        help="web page: segment an image against a saved or uploaded bank (extra `app`)",
        description="Serve the in-context segmentation page against a running Triton server. "
        "Settings: AppConfig fields as key=value (e.g. max_upload_mb=32); flags override the YAML.",
    )
    parser.add_argument("--config", default=None, help="YAML with AppConfig fields (configs/app.yaml)")
    parser.add_argument("--url", default=None, help="Triton host:port (default localhost:8001 grpc, 8000 http)")
    transport = parser.add_argument(
        "--transport", dest="protocol", choices=("grpc", "http"), default=None, help=f"default {defaults.protocol}"
    )
    deprecated_alias(parser, transport, "--protocol")  # the old spelling, for one release
    parser.add_argument("--banks", default=None, help=f"folder of saved banks (default {defaults.banks})")
    parser.add_argument("--host", default=None, help=f"address to bind (default {defaults.host}: this machine only)")
    parser.add_argument("--port", type=int, default=None, help=f"port of the page (default {defaults.port})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="AppConfig overrides")
    parser.set_defaults(handler=app_command)


def load_app_config(args: argparse.Namespace) -> AppConfig:
    """The YAML, then key=value overrides, then the explicit flags."""
    from neco.config import load_config

    overrides = list(args.overrides)
    for key in ("url", "protocol", "banks", "host", "port"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(AppConfig, args.config, overrides)


def app_command(args: argparse.Namespace) -> int:
    config = load_app_config(args)
    missing = [name for name in APP_MODULES if not _importable(name)]
    if missing:
        raise MissingExtraError("neco app", missing[0], "app")
    from neco.app.server import serve

    serve(config)
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
