"""Training checkpoints: everything needed to resume, written atomically.

A checkpoint is a plain dict of tensors and builtins, so it loads with
`torch.load(weights_only=True)`. Files are written to a temporary name in the same folder and
renamed into place, so a crash mid-write never leaves a truncated "latest" checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from neco.atomic import atomic_write
from neco.contract import TRAINING_CHECKPOINT_KIND
from neco.errors import NecoError

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(NecoError, ValueError):
    """A checkpoint is missing, unreadable or belongs to an incompatible run."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (+ kind/version/step) as step_XXXXXXXX.pt atomically; prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    payload = {"kind": TRAINING_CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "step": step, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first (temporary files are ignored)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint safely (weights_only) and check its kind and version."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types; all mean "unusable"
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("kind") != TRAINING_CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a NeCo training checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has version {state['version']}, newer than {CHECKPOINT_VERSION}")
    return state
