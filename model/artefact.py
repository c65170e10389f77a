"""The training artefact that export consumes: timm-named safetensors + JSON metadata.

    ARTEFACT/backbone.safetensors   the backbone's state dict (timm naming)
    ARTEFACT/metadata.json          format_version, the `ModelContract`, the training config

Both files are published with `neco.atomic`, weights first, so a reader never sees metadata
for weights that are not complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from neco.atomic import atomic_write, atomic_write_text
from neco.contract import ARTEFACT_FORMAT_VERSION, ARTEFACT_METADATA, ARTEFACT_WEIGHTS, ModelContract
from neco.model.errors import ArchitectureMismatchError, WeightsError


def config_hash(training_config: Mapping[str, Any]) -> str:
    """Stable short hash of a training config (canonical JSON), recorded in the contract."""
    canonical = json.dumps(training_config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def save_artefact(
    model: VisionTransformer, contract: ModelContract, out_dir: str | Path, training_config: dict[str, Any]
) -> Path:
    """Write the export artefact (timm-named safetensors + metadata) atomically; return its dir."""
    out_dir = Path(out_dir)
    if model.embed_dim != contract.embed_dim or model.num_reg_tokens != contract.num_registers:
        raise ArchitectureMismatchError(
            f"model (dim {model.embed_dim}, {model.num_reg_tokens} registers) does not match "
            f"contract (dim {contract.embed_dim}, {contract.num_registers} registers)"
        )
    digest = config_hash(training_config)
    if contract.training_hash and contract.training_hash != digest:
        raise ValueError(f"contract training_hash {contract.training_hash!r} != config hash {digest!r}")
    contract = contract.model_copy(update={"training_hash": digest})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format_version": ARTEFACT_FORMAT_VERSION,
        "contract": contract.model_dump(mode="json"),
        "training_config": training_config,
    }
    # weights first: metadata that names weights which are not there yet is never visible
    atomic_write(out_dir / ARTEFACT_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"arch": contract.arch}))
    atomic_write_text(out_dir / ARTEFACT_METADATA, json.dumps(metadata, indent=2, default=str))
    return out_dir


def read_artefact_contract(artefact_dir: str | Path) -> ModelContract:
    """Validate an artefact's metadata and return its contract (no weights are read)."""
    meta_path = Path(artefact_dir) / ARTEFACT_METADATA
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist; not a NeCo training artefact")
    try:
        meta = json.loads(meta_path.read_text())
        version = int(meta["format_version"])
        contract = ModelContract.model_validate(meta["contract"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{meta_path}: malformed artefact metadata ({exc})") from None
    if version > ARTEFACT_FORMAT_VERSION:
        raise WeightsError(f"{meta_path}: format_version {version} is newer than supported {ARTEFACT_FORMAT_VERSION}")
    return contract
