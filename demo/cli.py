"""`neco demo`: scenes -> NeCo -> ONNX -> embedded Triton -> bank -> segment() (imports lazily)."""

from __future__ import annotations

import argparse

from neco.demo.run import add_backbone_option


def _demo(args: argparse.Namespace) -> int:
    from neco.demo.run import main as demo_main

    argv = ["--config", args.config] if args.config else []
    argv += ["--backbone", args.backbone] if args.backbone else []
    return demo_main([*argv, *args.overrides])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `neco demo` to the `neco` console script."""
    demo = subparsers.add_parser("demo", help="end-to-end demo: scenes -> NeCo -> ONNX -> Triton -> segment")
    demo.add_argument("--config", default="configs/demo.yaml", help="demo YAML config")
    add_backbone_option(demo)
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    demo.set_defaults(handler=_demo)
