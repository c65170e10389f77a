"""`neco demo`: scenes -> NeCo -> ONNX -> embedded Triton -> bank -> segment() (imports lazily)."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    from neco.demo.run import main as demo_main

    argv = ["--config", args.config, *args.overrides] if args.config else list(args.overrides)
    return demo_main(argv)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `neco demo` to the `neco` console script."""
    demo = subparsers.add_parser("demo", help="end-to-end demo: scenes -> NeCo -> ONNX -> Triton -> segment")
    demo.add_argument("--config", default="configs/demo.yaml", help="demo YAML config")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    demo.set_defaults(handler=_demo)
