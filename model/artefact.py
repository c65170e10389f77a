"""The training artefact that export consumes: timm-named safetensors + JSON metadata.

    ARTEFACT/backbone.safetensors   the backbone's state dict (timm naming)
    ARTEFACT/metadata.json          format_version, the `ModelContract`, the training config,
                                    the sha256 of the weights file

Both files are published with `neco.atomic`, weights first, so a reader never sees metadata
for weights that are not complete; the recorded digest makes a truncated or bit-flipped
weights file fail loudly instead of loading silently. Training checkpoints get the same
protection from a `sha256sum`-style sidecar (`write_checksum` / `verify_checksum`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from neco.atomic import atomic_write, atomic_write_text
from neco.contract import ARTEFACT_FORMAT_VERSION, ARTEFACT_METADATA, ARTEFACT_WEIGHTS, ModelContract
from neco.model.errors import ArchitectureMismatchError, WeightsError

CHECKSUM_SUFFIX = ".sha256"
WEIGHTS_DIGEST_KEY = "weights_sha256"

RUN_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "": ("output_dir",),
    "runtime": ("progress", "tensorboard", "log_every", "checkpoint_every", "keep_checkpoints"),
}
"""Config fields that say where a run writes and how it is watched, not what it computes:
left out of `config_hash`, so the same recipe run in another folder has the same hash."""


def config_hash(training_config: Mapping[str, Any]) -> str:
    """Stable short hash of what a training config computes (canonical JSON), recorded in the contract."""
    recipe = {k: v for k, v in training_config.items() if k not in RUN_ONLY_FIELDS[""]}
    for section, fields in RUN_ONLY_FIELDS.items():
        if section and isinstance(recipe.get(section), Mapping):
            recipe[section] = {k: v for k, v in recipe[section].items() if k not in fields}
    canonical = json.dumps(recipe, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: Path, digest_of: Path | None = None) -> Path:
    """Publish the sha256 of `digest_of` (default `path`) as `<path>.sha256`, atomically.

    The format is `sha256sum`'s, so `sha256sum -c step_00000002.pt.sha256` checks it too.
    A checkpoint hashes its temporary file before the rename, so no checkpoint is ever
    visible without its checksum.
    """
    return atomic_write_text(checksum_path(path), f"{file_sha256(digest_of or path)}  {path.name}\n")


def verify_checksum(path: Path, *, required: bool) -> None:
    """Refuse `path` (WeightsError) when its content differs from its `.sha256` sidecar.

    A missing sidecar is an error only with `required` (files from before checksums existed
    still load where that is safe).
    """
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        if required:
            raise WeightsError(f"{path}: checksum file {sidecar.name} is missing; the file cannot be verified")
        return
    words = sidecar.read_text(errors="replace").split()
    expected = words[0] if words else "(empty)"
    actual = file_sha256(path)
    if actual != expected:
        raise WeightsError(
            f"{path}: sha256 {actual[:16]}... does not match {sidecar.name} ({expected[:16]}...): corrupt"
        )


def save_artefact(
    model: nn.Module, contract: ModelContract, out_dir: str | Path, training_config: dict[str, Any]
) -> Path:
    """Write the export artefact (timm-named safetensors + metadata) atomically; return its dir."""
    out_dir = Path(out_dir)
    found = (model.embed_dim, model.num_prefix_tokens, model.patch_embed.patch_size[0])
    expected = (contract.embed_dim, contract.num_prefix_tokens, contract.patch_size)
    if found != expected:
        raise ArchitectureMismatchError(
            f"model (dim, prefix tokens, patch) {found} does not match the contract's {expected} ({contract.arch})"
        )
    digest = config_hash(training_config)
    if contract.training_hash and contract.training_hash != digest:
        raise ValueError(f"contract training_hash {contract.training_hash!r} != config hash {digest!r}")
    contract = contract.model_copy(update={"training_hash": digest})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # weights first: metadata that names weights which are not there yet is never visible
    weights = atomic_write(
        out_dir / ARTEFACT_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"arch": contract.arch})
    )
    metadata = {
        "format_version": ARTEFACT_FORMAT_VERSION,
        "contract": contract.model_dump(mode="json"),
        "training_config": training_config,
        WEIGHTS_DIGEST_KEY: file_sha256(weights),
    }
    atomic_write_text(out_dir / ARTEFACT_METADATA, json.dumps(metadata, indent=2, default=str))
    return out_dir


def verify_artefact_weights(artefact_dir: str | Path) -> None:
    """Refuse an artefact whose weights file is missing or differs from the digest in its metadata."""
    artefact_dir = Path(artefact_dir)
    weights = artefact_dir / ARTEFACT_WEIGHTS
    if not weights.is_file():
        raise WeightsError(f"{weights} is missing; the artefact is incomplete")
    expected = _read_metadata(artefact_dir / ARTEFACT_METADATA).get(WEIGHTS_DIGEST_KEY)
    if expected is None:
        return  # written before digests were recorded
    actual = file_sha256(weights)
    if actual != expected:
        raise WeightsError(
            f"{weights}: sha256 {actual[:16]}... differs from metadata.json ({str(expected)[:16]}...): corrupt"
        )


def _read_metadata(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{meta_path}: malformed artefact metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{meta_path}: malformed artefact metadata (not a JSON object)")
    return meta


def read_artefact_contract(artefact_dir: str | Path) -> ModelContract:
    """Validate an artefact's metadata and return its contract (no weights are read)."""
    meta_path = Path(artefact_dir) / ARTEFACT_METADATA
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist; not a NeCo training artefact")
    meta = _read_metadata(meta_path)
    try:
        version = meta["format_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"format_version must be a positive integer, got {version!r}")
        contract = ModelContract.model_validate(meta["contract"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{meta_path}: malformed artefact metadata ({exc})") from None
    if version > ARTEFACT_FORMAT_VERSION:
        raise WeightsError(f"{meta_path}: format_version {version} is newer than supported {ARTEFACT_FORMAT_VERSION}")
    return contract
