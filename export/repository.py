"""Triton model repository: config.pbtxt from Triton's own protobuf schema, written atomically.

Torch-free on purpose: serving and the client read the served contract from here with only
`tritonclient` installed. The config is built as a `model_config_pb2.ModelConfig` message (not
as hand-written text), so every field name and enum is checked by the schema Triton itself
parses, and `read_model_config` is the exact inverse of what `write_model_directory` wrote.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from neco.contract import INPUT_IMAGES, OUTPUT_CLS, OUTPUT_FEATURES, OUTPUT_FEATURES_RAW, ModelContract
from neco.export.config import TritonSettings
from neco.export.errors import RepositoryError

CONFIG_FILENAME = "config.pbtxt"
ONNX_FILENAME = "model.onnx"
PLAN_FILENAME = "model.plan"

Backend = Literal["onnxruntime", "tensorrt"]


def build_model_config(
    model_name: str,
    contract: ModelContract,
    settings: TritonSettings,
    backend: Backend = "onnxruntime",
    extra_parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """The served interface: UINT8 [-1,-1,3] images in, FP32 patch grids and CLS out.

    Batch is implicit (`max_batch_size` > 0), H and W are -1 because one graph serves every
    multiple-of-14 size. The contract travels in `parameters` so a client can discover the
    encoder, its normalisation and training hash from the server alone.
    """
    cfg = mc.ModelConfig(name=model_name, max_batch_size=settings.max_batch_size)
    if backend == "onnxruntime":
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = ONNX_FILENAME
    elif backend == "tensorrt":
        cfg.backend = "tensorrt"
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = PLAN_FILENAME
    else:
        raise RepositoryError(f"unknown Triton backend {backend!r}; expected onnxruntime or tensorrt")
    cfg.input.add(name=INPUT_IMAGES, data_type=mc.TYPE_UINT8, dims=[-1, -1, 3])
    dim = contract.embed_dim
    cfg.output.add(name=OUTPUT_FEATURES, data_type=mc.TYPE_FP32, dims=[-1, -1, dim])
    cfg.output.add(name=OUTPUT_FEATURES_RAW, data_type=mc.TYPE_FP32, dims=[-1, -1, dim])
    cfg.output.add(name=OUTPUT_CLS, data_type=mc.TYPE_FP32, dims=[dim])

    batching = cfg.dynamic_batching
    batching.preferred_batch_size.extend(settings.preferred_batch_sizes)
    batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    batching.default_queue_policy.max_queue_size = settings.max_queue_size
    batching.default_queue_policy.timeout_action = mc.ModelQueuePolicy.REJECT

    group = cfg.instance_group.add(
        count=settings.instance_count, kind=mc.ModelInstanceGroup.Kind.Value(settings.instance_kind)
    )
    group.gpus.extend(settings.gpus)

    parameters = {**contract.to_parameters(), **(extra_parameters or {})}
    for key, value in sorted(parameters.items()):
        cfg.parameters[key].string_value = value
    return cfg


def config_to_text(cfg: mc.ModelConfig) -> str:
    """Protobuf text format, which is what Triton reads from config.pbtxt."""
    return text_format.MessageToString(cfg)


def parse_config_text(text: str, source: str = "<text>") -> mc.ModelConfig:
    """Parse config.pbtxt text with Triton's schema; malformed text raises RepositoryError."""
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source}: not a valid Triton model config: {exc}") from None
    return cfg


def read_model_config(model_dir: str | Path) -> mc.ModelConfig:
    """Read `<model_dir>/config.pbtxt` into a ModelConfig message."""
    path = Path(model_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist; not a Triton model directory")
    return parse_config_text(path.read_text(), str(path))


def contract_from_config(cfg: mc.ModelConfig) -> ModelContract:
    """Recover the ModelContract that export stored in the config's `parameters`."""
    return ModelContract.from_parameters({key: param.string_value for key, param in cfg.parameters.items()})


def ensure_writable_repository(repo_root: str | Path, model_name: str, overwrite: bool) -> Path:
    """Create the repository root if needed and fail early if the model cannot be written.

    Called before the (minutes-long) export starts, so an unwritable output or an existing
    model without `overwrite` costs nothing.
    """
    root = Path(repo_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RepositoryError(f"cannot create model repository {str(root)!r}: {exc.strerror or exc}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RepositoryError(f"model repository {str(root)!r} is not writable")
    target = root / model_name
    if target.exists() and not overwrite:
        raise RepositoryError(f"{target} already exists; set overwrite=true to replace it")
    return target


def write_model_directory(
    repo_root: str | Path,
    cfg: mc.ModelConfig,
    files: Mapping[str, Path],
    *,
    model_dir_files: Mapping[str, Path] | None = None,
    version: int = 1,
    overwrite: bool = False,
    move_files: bool = False,
) -> Path:
    """Assemble `<repo>/<cfg.name>/` in a hidden staging dir, then move it into place.

    `files` maps names inside the version directory (e.g. "model.onnx") to existing files,
    `model_dir_files` names next to config.pbtxt (reports; Triton ignores them). On any error the
    staging directory is removed and an existing model is left untouched; on success the old
    model (if `overwrite`) is replaced with a rename, so readers never see a half-written model.
    """
    target = ensure_writable_repository(repo_root, cfg.name, overwrite)
    root = target.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.staging-", dir=root))
    try:
        version_dir = staging / str(version)
        version_dir.mkdir()
        placements = [(version_dir, files), (staging, model_dir_files or {})]
        for directory, mapping in placements:
            for name, source in mapping.items():
                if Path(name).name != name:
                    raise RepositoryError(f"file name {name!r} must be a plain name, not a path")
                if not Path(source).is_file():
                    raise RepositoryError(f"file to place as {name!r} does not exist: {source}")
                (shutil.move if move_files else shutil.copy2)(str(source), str(directory / name))
        (staging / CONFIG_FILENAME).write_text(config_to_text(cfg))
        parse_config_text((staging / CONFIG_FILENAME).read_text(), str(staging / CONFIG_FILENAME))
        _swap_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename staging -> target; an old model is renamed aside first and deleted only after."""
    if not target.exists():
        os.replace(staging, target)
        return
    if not overwrite:
        raise RepositoryError(f"{target} appeared while exporting; refusing to replace it")
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
