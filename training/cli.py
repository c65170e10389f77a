"""`neco train ...`: the training sub-command (torch is imported only inside the handler)."""

from __future__ import annotations

import argparse


def _handle(args: argparse.Namespace) -> int:
    from neco.training.run import run_from_args

    return run_from_args(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the `neco` console script."""
    from neco.training.run_args import add_train_arguments

    parser = subparsers.add_parser(
        "train",
        help="NeCo post-pretraining of a DINOv2 backbone",
        description="NeCo post-pretraining of a DINOv2 backbone",
    )
    add_train_arguments(parser)
    parser.set_defaults(handler=_handle)
