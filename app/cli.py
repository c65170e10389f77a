"""`neco app`: serve the in-context segmentation page (extra `app`); torch- and FastAPI-free at import.

neco app --serve model_repository/ [--examples DIR]   # the page and its own Triton server, one process
neco app [--url HOST:PORT] [--transport grpc|http] [--config configs/app.yaml] [--banks DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
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
        help="web page: paint a few strokes on one image, segment the rest (extra `app`)",
        description="Serve the in-context segmentation page: with --serve REPOSITORY it starts its own Triton "
        "server (stopped with the page: one process), otherwise it talks to a running one (--url). "
        "Settings: AppConfig fields as key=value (e.g. max_upload_mb=32); flags override the YAML.",
    )
    parser.add_argument(
        "--serve",
        type=Path,
        default=None,
        metavar="REPOSITORY",
        help="start the embedded Triton server on this model repository (neco export) with the page",
    )
    parser.add_argument("--examples", default=None, help="support folder (images/, masks/) offered as examples")
    parser.add_argument("--config", default=None, help="YAML with AppConfig fields (configs/app.yaml)")
    parser.add_argument(
        "--url", default=None, help="a running Triton's host:port (default localhost:8001 grpc, 8000 http)"
    )
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
    for key in ("url", "protocol", "banks", "host", "port", "examples"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(AppConfig, args.config, overrides)


def app_command(args: argparse.Namespace) -> int:
    """Run the page; with --serve, inside the lifetime of its own Triton server."""
    from neco.config import ConfigError

    config = load_app_config(args)
    missing = [name for name in APP_MODULES if not _importable(name)]
    if missing:
        raise MissingExtraError("neco app", missing[0], "app")
    from neco.app.server import serve

    if args.serve is None:
        serve(config)
        return 0
    if args.url is not None:
        raise ConfigError("give either --serve REPOSITORY (start a server) or --url HOST:PORT (use a running one)")
    if not args.serve.is_dir():
        raise ConfigError(f"model repository {str(args.serve)!r} does not exist; run `neco export` first")
    from neco.app.launcher import embedded_server

    with contextlib.suppress(KeyboardInterrupt):  # SIGTERM or Ctrl+C: the page, then the server, have stopped
        with embedded_server(args.serve, config.model) as url:
            serve(config.model_copy(update={"url": url, "protocol": "grpc"}))
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
