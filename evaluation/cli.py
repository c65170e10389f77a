"""`neco eval hummingbird|linear|overcluster|keypoints|all` (torch-free at import: handlers import lazily).

Every flag is a shortcut for a `key=value` override of the command's pydantic config, so a
YAML file (`--config configs/eval_hummingbird.yaml`), flags and trailing overrides compose
and are validated in one place (`neco.config.load_config`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from neco.cli import deprecated_alias
from neco.contract import DEFAULT_K, DEFAULT_TEMPERATURE

PROTOCOL_CHOICES = ("hbird-eval", "strict", "both")


def _protocol(value: str) -> str:
    if value in ("grpc", "http"):
        raise argparse.ArgumentTypeError(f"{value!r} is a Triton transport: use --transport {value}")
    if value not in PROTOCOL_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown protocol {value!r}; use one of {', '.join(PROTOCOL_CHOICES)}")
    return value


def _flag(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() in ("true", "1", "yes")


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _words(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


# Every flag default is None = "not given".
Flags = tuple[tuple[str, str, Callable[[str], Any], str], ...]
"""(flag, config key, argparse type, help) rows of one sub-command."""
Handler = Callable[[argparse.Namespace], int]

COMMON_FLAGS: Flags = (
    ("--dataset", "dataset", str, "voc | ade20k | coco-stuff | cityscapes | folder"),
    ("--data-root", "data_root", str, "dataset root directory"),
    ("--train-split", "train_split", str, "split the bank / head is built from"),
    ("--val-split", "val_split", str, "split that is scored"),
    ("--train-subset", "train_subset", int, "use 1/N of the train split"),
    ("--size", "input_size", int, "encoder input side (rounded down to a multiple of the model's patch)"),
    ("--seed", "seed", int, "random seed"),
    ("--out", "out", str, "write the JSON report here"),
    ("--backend", "backend.kind", str, "triton | onnx | torch (default: torch with --source or --arch, else triton)"),
    ("--source", "backend.model", str, "onnx: model.onnx / model dir; torch: artefact or checkpoint"),
    ("--url", "backend.url", str, "triton: server URL"),
    ("--transport", "backend.protocol", str, "triton: grpc | http"),
    ("--model-name", "backend.model_name", str, "triton: model name"),
    ("--arch", "backend.arch", str, "timm architecture (torch: stock weights; onnx without config.pbtxt)"),
    ("--device", "backend.device", str, "torch: auto | cpu | cuda"),
    ("--batch-size", "backend.batch_size", int, "images per backend call"),
)
BACKEND_FLAGS = COMMON_FLAGS[8:]
SEGMENTATION_FLAGS = COMMON_FLAGS + (
    ("--hbird-eval-std-typo", "hbird_eval_std_typo", _flag, "open-hummingbird-eval's typo'd std 0.255 (torch only)"),
)
HUMMINGBIRD_FLAGS = (
    ("--protocol", "protocol", _protocol, "hbird-eval | strict | both (see above)"),
    ("--val-subset", "val_subset", int, "use 1/N of the val split"),
    ("--k", "k", int, f"nearest neighbours (protocol: {DEFAULT_K})"),
    ("--temperature", "temperature", float, f"softmax temperature (protocol: {DEFAULT_TEMPERATURE})"),
    ("--memory-size", "memory_size", int, "memory bound in patches (over all passes)"),
    ("--augment-passes", "augment_passes", int, "memory passes over the train split"),
    ("--upsample", "upsample", str, "bilinear (the protocol's, default) | guided by the image (edges; not comparable)"),
)
OVERCLUSTER_FLAGS = (
    ("--protocol", "protocol", str, "neco (default: the NeCo repository's) | raw (see above)"),
    ("--clusters", "clusters", _ints, "comma-separated K values (default 100,300,500)"),
    ("--val-subset", "val_subset", int, "use 1/N of the val split"),
    ("--niter", "niter", int, "k-means iterations (default: the protocol's, neco 100, raw 20)"),
)
KEYPOINT_FLAGS = (
    ("--data-root", "data_root", str, "SPair-71k root (holds JPEGImages/ and PairAnnotation/)"),
    ("--split", "split", str, "trn | val | test"),
    ("--size", "input_size", int, "square input side (rounded down to a multiple of the model's patch)"),
    ("--max-pairs", "max_pairs", int, "score only the first N pairs"),
    ("--soft-argmax", "soft_argmax", _flag, "refine matches by a windowed soft-argmax"),
    ("--out", "out", str, "write the JSON report here"),
) + BACKEND_FLAGS
REPORT_FLAGS = (
    ("--evaluations", "evaluations", _words, "comma-separated: overcluster,hummingbird,linear,keypoints"),
    ("--protocol", "protocol", _protocol, "hummingbird protocol(s): hbird-eval | strict | both"),
    ("--clusters", "clusters", _ints, "overclustering K values (default 500)"),
    ("--overcluster-protocol", "overcluster_protocol", str, "overclustering protocol: neco | raw"),
    ("--size", "input_size", int, "encoder input side"),
    ("--train-split", "train_split", str, "memory / head split (e.g. trainaug for VOC)"),
    ("--val-split", "val_split", str, "scored split"),
    ("--train-subset", "train_subset", int, "use 1/N of the train split"),
    ("--val-subset", "val_subset", int, "use 1/N of the val split"),
    ("--memory-size", "memory_size", int, "Hummingbird memory bound in patches"),
    ("--epochs", "epochs", int, "linear head epochs"),
    ("--out", "out", str, "output path without suffix: writes <out>.json and <out>.md"),
) + tuple(f for f in BACKEND_FLAGS if f[0] != "--source")
LINEAR_FLAGS = (
    ("--epochs", "epochs", int, "head training epochs"),
    ("--lr", "lr", float, "head learning rate"),
    ("--head-batch-size", "batch_size", int, "images per head optimisation step"),
    ("--head-device", "device", str, "where the head trains: auto | cpu | cuda"),
)


OLD_SPELLINGS: dict[str, tuple[str, ...]] = {
    "--size": ("--input-size",),
    "--source": ("--model",),
    "--temperature": ("--beta",),
}
"""Flags renamed to `neco.cli.VOCABULARY`'s names: the old spellings work for one release, with a notice."""


def _add_flags(parser: argparse.ArgumentParser, flags: Flags) -> None:
    for flag, key, kind, text in flags:
        if kind is _flag:  # `--soft-argmax` alone means true; `--soft-argmax false` still works
            action = parser.add_argument(
                flag, dest=key, type=kind, nargs="?", const=True, default=None, help=text, metavar="BOOL"
            )
        else:
            metavar = key.split(".")[-1].upper()
            action = parser.add_argument(flag, dest=key, type=kind, default=None, help=text, metavar=metavar)
        deprecated_alias(parser, action, *OLD_SPELLINGS.get(flag, ()))


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (flags and overrides win)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides")


def _overrides(args: argparse.Namespace, flags: Flags) -> list[str]:
    """Given flags as `key=<json>` overrides (JSON is YAML, so values keep their types)."""
    given = [(key, getattr(args, key)) for _, key, _, _ in flags if getattr(args, key) is not None]
    return [f"{key}={json.dumps(value)}" for key, value in given] + list(args.overrides)


def _served_unless_given(cfg: Any) -> Any:
    """`cfg` with the backend kind of `neco.evaluation.config.served_unless_given`."""
    from neco.evaluation.config import served_unless_given

    return cfg.model_copy(update={"backend": served_unless_given(cfg.backend)})


def _hummingbird(args: argparse.Namespace) -> int:
    from neco.config import load_config
    from neco.evaluation.hummingbird import HummingbirdConfig, run_hummingbird

    flags = SEGMENTATION_FLAGS + HUMMINGBIRD_FLAGS
    run_hummingbird(_served_unless_given(load_config(HummingbirdConfig, args.config, _overrides(args, flags))))
    return 0


def _linear(args: argparse.Namespace) -> int:
    from neco.config import load_config
    from neco.evaluation.linear import LinearConfig, run_linear

    cfg = _served_unless_given(
        load_config(LinearConfig, args.config, _overrides(args, SEGMENTATION_FLAGS + LINEAR_FLAGS))
    )
    run_linear(cfg, cfg.build_backend())
    return 0


def _overcluster(args: argparse.Namespace) -> int:
    from neco.config import load_config
    from neco.evaluation.overcluster import OverclusterConfig, run_overcluster

    flags = SEGMENTATION_FLAGS + OVERCLUSTER_FLAGS
    run_overcluster(_served_unless_given(load_config(OverclusterConfig, args.config, _overrides(args, flags))))
    return 0


def _keypoints(args: argparse.Namespace) -> int:
    from neco.config import load_config
    from neco.evaluation.keypoints import KeypointConfig, run_keypoints

    run_keypoints(_served_unless_given(load_config(KeypointConfig, args.config, _overrides(args, KEYPOINT_FLAGS))))
    return 0


def _all(args: argparse.Namespace) -> int:
    from neco.config import load_config
    from neco.evaluation.report import ReportConfig, run_report

    lists = [
        f"{key}={json.dumps(value)}" for key, value in (("models", args.models), ("datasets", args.datasets)) if value
    ]
    run_report(load_config(ReportConfig, args.config, lists + _overrides(args, REPORT_FLAGS)))
    return 0


OVERCLUSTER_HELP = """Overclustering (NeCo's / Leopart's unsupervised column): faiss k-means on the val patch features
at the square input size for each K, clusters mapped to classes many-to-one (each to the class it overlaps
most), plus K = classes with Hungarian matching; mIoU over all classes. Protocols (--protocol):
  neco  the default, as the NeCo repository runs it: features standardised and reduced to 50 dimensions
        by PCA, k-means 100 iterations x 5 restarts, seeds 0-4 averaged, masks and predictions scored
        at 100x100 (torch nearest). Comparable with the NeCo paper's overclustering column.
  raw   this project's quick protocol: raw features, 20 iterations, one seed, scored at the input size.
The JSON report's `protocol` names the one that produced its numbers."""


HUMMINGBIRD_HELP = """Protocols (--protocol; docs/evaluation.md says which paper each is comparable with):
  hbird-eval  open-hummingbird-eval v2.0.0 scoring, the default for voc/ade20k/coco-stuff/cityscapes:
              images (bilinear + antialias) and masks (torch nearest) resized to input_size x input_size
              as open-hummingbird-eval does, and scored there;
              memory labels with 255 -> class 0; bounded memory keeps rare-class patches first; every
              memory pass augmented (random-resized crop 0.5-2.0 + colour jitter); predicted labels
              Hungarian-matched to classes; mIoU over ALL classes (absent class = 0). Comparable with
              NeCo's and DIP's dense-NN columns and open-hummingbird-eval. Normalisation uses the
              correct ImageNet std; --hbird-eval-std-typo reproduces that code's 0.255 blue std.
  strict      this project's scoring, the default for folder: masks scored at their own size, ignore
              pixels excluded from memory labels, no label matching, classes absent from prediction
              and target left out of the mean. It measures what `neco segment` gives applications.
  both        run both; the JSON's top level is hbird-eval, `results` holds each protocol."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `neco eval ...`."""
    evaluate = subparsers.add_parser("eval", help="evaluate dense features (Hummingbird, linear, overclustering, ...)")
    protocols = evaluate.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    raw = argparse.RawDescriptionHelpFormatter

    def evaluation(name: str, handler: Handler, flags: Flags, model: str, **parser_options: Any) -> None:
        parser = protocols.add_parser(name, **parser_options)
        _add_flags(parser, flags)
        _add_config(parser)
        parser.set_defaults(handler=handler, config_model=model)  # --help shows the model's defaults

    evaluation(
        "hummingbird",
        _hummingbird,
        SEGMENTATION_FLAGS + HUMMINGBIRD_FLAGS,
        "neco.evaluation.hummingbird:HummingbirdConfig",
        help="in-context k-NN segmentation mIoU",
        description=HUMMINGBIRD_HELP,
        formatter_class=raw,
    )
    evaluation(
        "linear",
        _linear,
        SEGMENTATION_FLAGS + LINEAR_FLAGS,
        "neco.evaluation.linear:LinearConfig",
        help="linear-probe segmentation mIoU (needs torch)",
        description="Linear probe: BatchNorm + 1x1 head on frozen features, logits upsampled to the full mask; "
        "mIoU over classes present (comparable with NeCo's linear column up to its training recipe).",
    )
    evaluation(
        "overcluster",
        _overcluster,
        SEGMENTATION_FLAGS + OVERCLUSTER_FLAGS,
        "neco.evaluation.overcluster:OverclusterConfig",
        help="unsupervised overclustering mIoU (k-means on val patches)",
        description=OVERCLUSTER_HELP,
        formatter_class=raw,
    )
    evaluation(
        "keypoints",
        _keypoints,
        KEYPOINT_FLAGS,
        "neco.evaluation.keypoints:KeypointConfig",
        help="SPair-71k keypoint correspondence PCK",
        description="Keypoint correspondence on SPair-71k: each source keypoint's patch is matched to the "
        "most cosine-similar target patch (optional soft-argmax); PCK@0.1 and @0.05 of max(target bbox w, h), "
        "per category and their mean.",
    )

    rep = protocols.add_parser(
        "all",
        help="every evaluation of every model: one JSON + a Markdown table (NeCo paper layout)",
        description="Run the chosen evaluations for each --source on each dataset and write <out>.json and "
        "<out>.md: rows = models, columns = dataset x protocol, each header naming its protocol.\n"
        "  neco eval all --source dinov2=vit_small_patch14_reg4_dinov2 --source neco=outputs/train/artefact "
        "--datasets voc=/data/VOCdevkit ade20k=/data/ADEChallengeData2016",
        formatter_class=raw,
    )
    models = rep.add_argument("--source", dest="models", action="append", default=None, metavar="NAME=SOURCE",
                              help="a model to evaluate (repeat); SOURCE is what --backend loads")  # fmt: skip
    deprecated_alias(rep, models, *OLD_SPELLINGS["--source"])
    rep.add_argument("--datasets", nargs="+", default=None, metavar="KIND=ROOT",
                     help="voc, ade20k, coco-stuff, cityscapes, folder or spair roots")  # fmt: skip
    _add_flags(rep, REPORT_FLAGS)
    rep.add_argument("--config", default=None, help="YAML config file (flags and overrides win)")
    rep.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    rep.set_defaults(handler=_all, config_model="neco.evaluation.report:ReportConfig")
