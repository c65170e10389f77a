"""`neco serve` (also `python -m neco.serving`): run the embedded Triton until SIGINT/SIGTERM;
`neco gateway`: the same request gateway alone, in front of a Triton it does not start.

    neco serve --repository model_repository/ [--config configs/serve_cpu.yaml] [key=value ...]
    neco gateway upstream_host=triton host=0.0.0.0 [--config configs/gateway.yaml] [key=value ...]

Torch-, onnxruntime- and pytriton-free at import: the handler imports the server lazily so that
`neco --help` and the client commands work in a client-only install.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` sub-command to the `neco` console script."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model repository with an embedded Triton (PyTriton + onnxruntime)",
        description="Start a real Triton Inference Server in-process on the repository's ONNX model; "
        "runs until SIGINT/SIGTERM. Settings: ServeConfig fields as key=value (e.g. http_port=0).",
    )
    parser.add_argument("--repository", type=Path, default=None, help="Triton model repository (from neco export)")
    parser.add_argument("--config", type=Path, default=None, help="YAML with ServeConfig fields (configs/serve_*.yaml)")
    parser.add_argument(
        "--verbose", action="store_true", help="Triton's log and PyTriton's INFO lines on the console (verbose=true)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="ServeConfig overrides")
    parser.set_defaults(handler=serve_command, config_model="neco.serving.config:ServeConfig")

    gateway = subparsers.add_parser(
        "gateway",
        help="check every request before a separately started Triton sees it (docker compose, sidecars)",
        description="The embedded server's request gateway alone: public HTTP/gRPC ports that refuse requests "
        "breaking the image rules or the limits, forwarding the rest to upstream_host. GatewayConfig fields as "
        "key=value (upstream_host is required).",
    )
    gateway.add_argument("--config", type=Path, default=None, help="YAML with GatewayConfig fields")
    gateway.add_argument("overrides", nargs="*", metavar="key=value", help="GatewayConfig overrides")
    gateway.set_defaults(handler=gateway_command, config_model="neco.serving.config:GatewayConfig")


def gateway_command(args: argparse.Namespace) -> int:
    """Start the gateway, print its endpoints, block until SIGINT/SIGTERM, then close it."""
    import signal
    import threading

    from neco.config import load_config
    from neco.serving.config import GatewayConfig
    from neco.serving.gateway import RequestGateway

    cfg = load_config(GatewayConfig, args.config, list(args.overrides))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    gateway = RequestGateway(
        cfg.host, (cfg.http_port, cfg.grpc_port), (cfg.upstream_http_port, cfg.upstream_grpc_port), cfg.limits,
        upstream_host=cfg.upstream_host, bodies=cfg.bodies,
    ).start()  # fmt: skip
    gateway.set_available(True)  # the upstream's own answers (or 503 when unreachable) say the rest
    try:
        http, grpc = gateway.bound_ports
        print(
            f"gateway on http {cfg.host}:{http}  grpc {cfg.host}:{grpc} -> {cfg.upstream_host}:"
            f"{cfg.upstream_http_port}/{cfg.upstream_grpc_port}  (Ctrl+C or SIGTERM to stop)",
            flush=True,
        )
        stop.wait()
    finally:
        gateway.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """Validate the config, start the server, print its endpoints, block until a signal."""
    from neco.config import ConfigError, load_config
    from neco.serving.config import ServeConfig

    overrides = list(args.overrides)
    if args.repository is not None:
        overrides.append(f"repository={args.repository}")
    if args.verbose:
        overrides.append("verbose=true")
    cfg = load_config(ServeConfig, args.config, overrides)
    if not cfg.repository.is_dir():
        raise ConfigError(f"model repository {str(cfg.repository)!r} does not exist; run `neco export` first")

    # Quiet by default: this project's INFO lines (start, stop), everybody else's warnings and errors.
    logging.basicConfig(
        level=logging.INFO if cfg.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("neco").setLevel(logging.INFO)
    from neco.serving.embedded import EmbeddedServer

    def announce(server: EmbeddedServer) -> None:
        print(
            f"serving {server.model_name} v{server.version} ({', '.join(server.providers)}) on http {server.http_url}  "
            f"grpc {server.grpc_url}  metrics {server.metrics_url}  (Ctrl+C or SIGTERM to stop)",
            flush=True,
        )

    EmbeddedServer(cfg).serve_forever(on_ready=announce)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m neco.serving ARGS` == `neco serve ARGS`."""
    from neco.cli import main as neco_main

    return neco_main(["serve", *(sys.argv[1:] if argv is None else argv)])
