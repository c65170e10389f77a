"""Training checkpoints: everything needed to resume, written atomically and checksummed.

A checkpoint is a plain dict of tensors and builtins, so it loads with
`torch.load(weights_only=True)`. It is written to a hidden temporary name in the same folder,
hashed, its `step_XXXXXXXX.pt.sha256` sidecar published, and only then renamed into place: a
crash at any point leaves either no new checkpoint or a complete one with its checksum, and a
file corrupted later (truncated, bit-flipped) fails `load_checkpoint` instead of loading
silently. Temporaries a crash leaves behind are removed by `remove_stale_files`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from neco.atomic import atomic_write
from neco.contract import TRAINING_CHECKPOINT_KIND
from neco.errors import NecoError
from neco.model import WeightsError
from neco.model.artefact import CHECKSUM_SUFFIX, checksum_path, verify_checksum, write_checksum

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")
_STALE = re.compile(r"^\.step_\d{8}\.pt(\.sha256)?\.tmp-")
"""Temporary names `neco.atomic.temporary_sibling` gives a checkpoint or its sidecar."""

log = logging.getLogger("neco.training")


class CheckpointError(NecoError, ValueError):
    """A checkpoint is missing, unreadable, corrupt or belongs to an incompatible run."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (+ kind/version/step) as step_XXXXXXXX.pt with its checksum; prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    payload = {"kind": TRAINING_CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "step": step, **state}

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        write_checksum(path, digest_of=tmp)  # before the rename: no checkpoint without its checksum

    atomic_write(path, write)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return path


def remove_stale_files(directory: Path) -> list[Path]:
    """Delete what interrupted writes left in `directory`: temporaries and orphan checksums.

    Only names this module writes are touched. Call it before a run (one run per output
    folder): a temporary belongs to a write that can no longer finish.
    """
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        orphan = entry.name.endswith(CHECKSUM_SUFFIX) and _NAME.match(entry.name[: -len(CHECKSUM_SUFFIX)])
        if (_STALE.match(entry.name) and entry.is_file()) or (orphan and not entry.with_suffix("").exists()):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d leftover file(s) of interrupted checkpoint writes in %s", len(removed), directory)
    return removed


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
    """Read a training checkpoint safely: checksum, then weights_only unpickling, kind and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        verify_checksum(path, required=True)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types; all mean "unusable"
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("kind") != TRAINING_CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a NeCo training checkpoint")
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has version {version!r}; this code reads versions 1..{CHECKPOINT_VERSION}")
    return state


def load_latest_valid(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint in `directory` that loads and verifies; corrupt newer ones are skipped.

    Each skipped file is logged as a warning with its reason; CheckpointError lists every
    reason when no checkpoint is usable.
    """
    problems = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
            problems.append(str(exc))
    detail = "; ".join(problems) if problems else "none found"
    raise CheckpointError(f"--resume: no usable checkpoint under {directory} ({detail})")
