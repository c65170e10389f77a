"""`neco export ...` sub-commands (torch-free at import; heavy modules load in the handlers).

- `neco export onnx`      weights -> Triton model dir with model.onnx (fp32/fp16/int8)
- `neco export tensorrt`  weights -> Triton model dir with a strongly typed model.plan (needs tensorrt + GPU)
- `neco export trtexec`   print (or run) the equivalent trtexec build for a container's TensorRT
- `neco export inspect`   parse a model dir's config.pbtxt and print its served contract
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from neco.config import ConfigError, apply_overrides, load_config, read_yaml
from neco.export.config import ExportConfig
from neco.export.errors import ExportError

TENSORRT_PRECISIONS = ("fp32", "fp16", "bf16")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML ExportConfig (configs/export_*.yaml)")
    parser.add_argument("--source", help="artefact dir, weight file or timm DINOv2 id (overrides config)")
    parser.add_argument("--arch", help="timm architecture, for weight files that do not name it")
    parser.add_argument("--out", type=Path, help="model repository root (overrides config `output`)")
    parser.add_argument("--model-name", help="Triton model name (overrides config)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. triton.max_batch_size=16"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Attach `export` and its sub-commands to the `neco` parser."""
    export = subparsers.add_parser("export", help="export weights to ONNX/TensorRT in a Triton model repository")
    sub = export.add_subparsers(dest="export_command", required=True, metavar="SUBCOMMAND")

    onnx = sub.add_parser("onnx", help="ONNX (onnxruntime backend); precision fp32, fp16 or int8")
    _add_common(onnx)
    onnx.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    onnx.set_defaults(handler=_run_onnx)

    trt = sub.add_parser("tensorrt", help="strongly typed TensorRT plan (tensorrt backend); needs tensorrt and a GPU")
    _add_common(trt)
    trt.add_argument("--precision", choices=TENSORRT_PRECISIONS, help="which ONNX the engine is parsed from")
    trt.set_defaults(handler=_run_tensorrt)

    trtexec = sub.add_parser("trtexec", help="print (or --run) the strongly typed trtexec build of an exported ONNX")
    trtexec.add_argument("--config", type=Path, help="YAML ExportConfig: its `tensorrt` section and `precision`")
    trtexec.add_argument("--onnx", type=Path, required=True, help="the FP32 model.onnx (or one already in --precision)")
    trtexec.add_argument("--engine", type=Path, required=True, help="where to save the engine (e.g. .../1/model.plan)")
    trtexec.add_argument("--precision", choices=TENSORRT_PRECISIONS, help="engine precision (default: config, fp32)")
    trtexec.add_argument(
        "--tensorrt-version",
        help="TensorRT of the image that builds AND serves the plan, e.g. 11 for Triton 26.08 (default: the installed tensorrt)",
    )
    trtexec.add_argument(
        "--reduced-onnx", type=Path, help="where the FP16/BF16 ONNX is written (default: beside --onnx)"
    )
    trtexec.add_argument("--trtexec", default="trtexec", help="trtexec executable")
    trtexec.add_argument("--run", action="store_true", help="run it instead of printing it")
    trtexec.add_argument(
        "overrides", nargs="*", metavar="key=value", help="tensorrt-section overrides, e.g. workspace_gib=8"
    )
    trtexec.set_defaults(handler=_run_trtexec)

    inspect = sub.add_parser("inspect", help="validate a model dir's config.pbtxt and print its contract")
    inspect.add_argument("model_dir", type=Path)
    inspect.add_argument("--check-engine", action="store_true", help="also verify model.plan against this GPU/TensorRT")
    inspect.set_defaults(handler=_run_inspect)


def _load(args: argparse.Namespace, extra: list[str]) -> ExportConfig:
    overrides = list(args.overrides)
    for key, value in (
        ("source", args.source),
        ("arch", args.arch),
        ("output", args.out),
        ("model_name", args.model_name),
    ):
        if value is not None:
            overrides.append(f"{key}={json.dumps(str(value))}")  # quoted: YAML must not retype it
    if args.overwrite:
        overrides.append("overwrite=true")
    return load_config(ExportConfig, args.config, overrides + extra)


def _export(cfg: ExportConfig) -> int:
    from neco.export.pipeline import REPORT_FILENAME, run_export

    model_dir = run_export(cfg)
    report = json.loads((model_dir / REPORT_FILENAME).read_text())
    parities = {key: report[key] for key in ("parity_fp32", "parity_fp16", "parity_int8") if key in report}
    if (report.get("tensorrt") or {}).get("parity_vs_onnxruntime"):
        parities["parity_tensorrt"] = report["tensorrt"]["parity_vs_onnxruntime"]
    for key, parity in parities.items():
        print(
            f"{key}: max_abs_diff={parity['max_abs_diff']:.3e} min_mean_cosine={parity['min_mean_cosine']:.5f}",
            file=sys.stderr,
        )
    print(model_dir)
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    extra = [f"precision={args.precision}"] if args.precision else []
    return _export(_load(args, extra + ["backend=onnxruntime"]))


def _run_tensorrt(args: argparse.Namespace) -> int:
    extra = [f"precision={args.precision}"] if args.precision else []
    return _export(_load(args, extra + ["backend=tensorrt"]))


def _run_trtexec(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from neco.export.config import TensorRTSettings
    from neco.export.tensorrt_build import trtexec_command

    # Only the config's `tensorrt` section and `precision` matter here; overrides are relative to the section.
    config = read_yaml(args.config) if args.config else {}
    try:
        settings = TensorRTSettings.model_validate(apply_overrides(config.get("tensorrt", {}), args.overrides))
    except ValidationError as exc:
        raise ConfigError(f"invalid tensorrt settings: {exc}") from None
    precision = args.precision or config.get("precision", "fp32")
    if precision not in TENSORRT_PRECISIONS:
        raise ConfigError(f"precision {precision!r}: TensorRT engines are built as one of {TENSORRT_PRECISIONS}")
    if not args.onnx.is_file():
        raise FileNotFoundError(f"ONNX file {args.onnx} does not exist")
    version = args.tensorrt_version or _installed_tensorrt_version()
    onnx_path = _onnx_in_precision(args.onnx, precision, args.reduced_onnx)
    command = trtexec_command(onnx_path, args.engine, settings, version, args.trtexec)
    if not args.run:
        print(shlex.join(command))
        return 0
    return subprocess.run(command, check=False).returncode


def _installed_tensorrt_version() -> str:
    try:
        import tensorrt
    except ImportError:
        raise ExportError(
            "no tensorrt package here: pass --tensorrt-version, the TensorRT of the image that builds and "
            "serves the plan (docs/tensorrt.md lists which Triton image ships which)"
        ) from None
    return tensorrt.__version__


def _onnx_in_precision(onnx_path: Path, precision: str, destination: Path | None) -> Path:
    """`onnx_path` if it already holds `precision`; else its FP16/BF16 graph, written to `destination`."""
    from neco.export.precision import TENSORRT_FP32_OPS, onnx_precision, reduced_precision_onnx

    found = onnx_precision(onnx_path)
    if found == precision:
        return onnx_path
    if found != "fp32":
        raise ExportError(f"{onnx_path} holds {found} weights: pass the FP32 export to build a {precision} engine")
    destination = destination or onnx_path.with_name(f"{onnx_path.stem}_{precision}.onnx")
    print(f"writing the {precision} ONNX the engine is parsed from: {destination}", file=sys.stderr)
    return reduced_precision_onnx(onnx_path, destination, precision, TENSORRT_FP32_OPS)


def _run_inspect(args: argparse.Namespace) -> int:
    from neco.triton_config import contract_from_config, read_model_config

    cfg = read_model_config(args.model_dir)
    contract = contract_from_config(cfg)
    print(
        json.dumps(
            {
                "model_name": cfg.name,
                "backend": cfg.backend,
                "max_batch_size": cfg.max_batch_size,
                "contract": contract.model_dump(mode="json"),
            },
            indent=2,
        )
    )
    if args.check_engine:
        from neco.export.tensorrt import verify_repository_engine

        meta = verify_repository_engine(args.model_dir)
        print(f"engine matches this setup: {meta.gpu_name}, TensorRT {meta.tensorrt_version}", file=sys.stderr)
    return 0
