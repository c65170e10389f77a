"""Writing a Triton model repository: `<repo>/<model>/{config.pbtxt, <version>/model.*}`.

The model config itself (the contract in `parameters`, the served tensors) is built and read
by the torch-free core (`neco.triton_config`), because serving and the client read it too;
this module only assembles a model directory and publishes it with `neco.atomic`, so readers
never see a half-written model and an existing one is replaced only when asked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from neco.atomic import staged_directory
from neco.triton_config import CONFIG_FILENAME, RepositoryError, config_to_text, parse_config_text


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
    try:
        with staged_directory(target, replace=overwrite) as staging:
            version_dir = staging / str(version)
            version_dir.mkdir()
            for directory, mapping in ((version_dir, files), (staging, model_dir_files or {})):
                for name, source in mapping.items():
                    if Path(name).name != name:
                        raise RepositoryError(f"file name {name!r} must be a plain name, not a path")
                    if not Path(source).is_file():
                        raise RepositoryError(f"file to place as {name!r} does not exist: {source}")
                    (shutil.move if move_files else shutil.copy2)(str(source), str(directory / name))
            (staging / CONFIG_FILENAME).write_text(config_to_text(cfg))
            parse_config_text((staging / CONFIG_FILENAME).read_text(), str(staging / CONFIG_FILENAME))
    except FileExistsError:
        raise RepositoryError(f"{target} appeared while exporting; refusing to replace it") from None
    return target
