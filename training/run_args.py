"""Command-line arguments of a training run, shared by `training/run.py`, `neco train` and
`python -m neco.training` (torch-free so that `neco --help` stays light)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, required=True, help="YAML file (see configs/train_*.yaml)")
    parser.add_argument(
        "--resume",
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
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.steps=10")
    return parser
