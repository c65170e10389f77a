"""Command-line arguments of a training run, shared by `training/run.py`, `neco train` and
`python -m neco.training` (torch-free so that `neco --help` stays light)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _is_override(text: str) -> bool:
    """`key=value` that is not an existing file (a checkpoint path may contain '=')."""
    return "=" in text and not Path(text).exists()


class _ResumeAction(argparse.Action):
    """`--resume [CHECKPOINT]`: a following `key=value` is an override, not a checkpoint path.

    argparse hands the optional value of `--resume` whatever comes next, so
    `--resume optim.steps=10` would otherwise try to load a checkpoint named "optim.steps=10".
    """

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: Any = None
    ) -> None:
        if isinstance(value, str) and _is_override(value):
            namespace.overrides = [*(namespace.overrides or []), value]
            value = True
        namespace.resume = value


class _OverridesAction(argparse.Action):
    """Positional `key=value ...`: extends (not replaces) what `--resume` already moved there."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        namespace.overrides = [*(namespace.overrides or []), *(values or [])]


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, required=True, help="YAML file (see configs/train_*.yaml)")
    parser.add_argument(
        "--resume",
        action=_ResumeAction,
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir (or from CHECKPOINT)",
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit after optimiser step STEP (continue later with --resume)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        action=_OverridesAction,
        metavar="key=value",
        help="config overrides, e.g. optim.steps=10",
    )
    return parser
