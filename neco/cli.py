"""The `neco` console script: one entry point, one sub-command group per stage.

Each stage folder provides a torch-free `cli.py` with `register(subparsers)`; heavy imports
(torch, onnxruntime, pytriton) happen inside the handlers, so `neco segment` works with only
the client extra installed.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from neco.errors import run_reporting_errors

# Stage modules that contribute sub-commands, in the order they appear in --help.
STAGE_CLIS: tuple[str, ...] = (
    "neco.training.cli",
    "neco.export.cli",
    "neco.serving.cli",
    "neco.client.cli",
    "neco.client.app_cli",
    "neco.evaluation.cli",
    "neco.demo.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neco", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in STAGE_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # stage not present in this checkout
            raise
        module.register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the chosen handler; expected errors end in one message.

    Shared by `neco` and the stage-only entry points (`python -m neco.client`), so every
    command reports errors the same way: `neco.errors.exit_code` decides the status.
    """
    args = parser.parse_args(argv)
    return run_reporting_errors(f"{parser.prog} {args.command}", lambda: args.handler(args))


def main(argv: Sequence[str] | None = None) -> int:
    """The `neco` console script."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
