"""`neco eval hummingbird|linear` (torch-free at import: handlers import lazily).

Every flag is a shortcut for a `key=value` override of the command's pydantic config, so a
YAML file (`--config configs/eval_hummingbird.yaml`), flags and trailing overrides compose
and are validated in one place (`neco.config.load_config`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

# (flag, config key, argparse type, help); every default is None = "not given".
COMMON_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--dataset", "dataset", str, "voc | ade20k | folder"),
    ("--data-root", "data_root", str, "dataset root directory"),
    ("--train-split", "train_split", str, "split the bank / head is built from"),
    ("--val-split", "val_split", str, "split that is scored"),
    ("--train-subset", "train_subset", int, "use 1/N of the train split"),
    ("--input-size", "input_size", int, "encoder input size (multiple of 14)"),
    ("--seed", "seed", int, "random seed"),
    ("--out", "out", str, "write the JSON report here"),
    ("--backend", "backend.kind", str, "triton | onnx | torch"),
    ("--model", "backend.model", str, "onnx: model.onnx / model dir; torch: artefact or checkpoint"),
    ("--url", "backend.url", str, "triton: server URL"),
    ("--protocol", "backend.protocol", str, "triton: grpc | http"),
    ("--model-name", "backend.model_name", str, "triton: model name"),
    ("--arch", "backend.arch", str, "timm architecture (torch: stock weights; onnx without config.pbtxt)"),
    ("--device", "backend.device", str, "torch: auto | cpu | cuda"),
    ("--batch-size", "backend.batch_size", int, "images per backend call"),
)
HUMMINGBIRD_FLAGS = (
    ("--val-subset", "val_subset", int, "use 1/N of the val split"),
    ("--k", "k", int, "nearest neighbours (protocol: 30)"),
    ("--beta", "beta", float, "softmax temperature (protocol: 0.02)"),
    ("--memory-size", "memory_size", int, "bank size bound in patches"),
    ("--augment-passes", "augment_passes", int, "passes over the train split (extra ones augmented)"),
)
LINEAR_FLAGS = (
    ("--epochs", "epochs", int, "head training epochs"),
    ("--lr", "lr", float, "head learning rate"),
    ("--head-batch-size", "batch_size", int, "images per head optimisation step"),
    ("--head-device", "device", str, "where the head trains: auto | cpu | cuda"),
)


def _add_flags(parser: argparse.ArgumentParser, flags: tuple[tuple[str, str, Callable[[str], Any], str], ...]) -> None:
    for flag, key, kind, text in flags:
        parser.add_argument(flag, dest=key, type=kind, default=None, help=text, metavar=key.split(".")[-1].upper())


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (flags and overrides win)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides")


def _overrides(args: argparse.Namespace, flags: tuple[tuple[str, str, Callable[[str], Any], str], ...]) -> list[str]:
    """Given flags as `key=<json>` overrides (JSON is YAML, so values keep their types)."""
    given = [(key, getattr(args, key)) for _, key, _, _ in flags if getattr(args, key) is not None]
    return [f"{key}={json.dumps(value)}" for key, value in given] + list(args.overrides)


def _hummingbird(args: argparse.Namespace) -> int:
    from neco.config import load_config
    from neco.evaluation.hummingbird import HummingbirdConfig, run_hummingbird

    flags = COMMON_FLAGS + HUMMINGBIRD_FLAGS
    cfg = load_config(HummingbirdConfig, args.config, _overrides(args, flags))
    run_hummingbird(cfg)
    return 0


def _linear(args: argparse.Namespace) -> int:
    from neco.config import load_config
    from neco.evaluation.linear import LinearConfig, run_linear

    cfg = load_config(LinearConfig, args.config, _overrides(args, COMMON_FLAGS + LINEAR_FLAGS))
    run_linear(cfg, cfg.backend.build())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `neco eval ...`."""
    evaluate = subparsers.add_parser("eval", help="evaluate dense features (Hummingbird, linear probe)")
    protocols = evaluate.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")

    hb = protocols.add_parser("hummingbird", help="in-context k-NN segmentation mIoU")
    _add_flags(hb, COMMON_FLAGS + HUMMINGBIRD_FLAGS)
    _add_config(hb)
    hb.set_defaults(handler=_hummingbird)

    lin = protocols.add_parser("linear", help="linear-probe segmentation mIoU (needs torch)")
    _add_flags(lin, COMMON_FLAGS + LINEAR_FLAGS)
    _add_config(lin)
    lin.set_defaults(handler=_linear)
