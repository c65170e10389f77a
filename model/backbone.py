"""DINOv2 backbones: creation through timm and loading from every supported weight format.

Supported sources for `load_backbone`:
- this project's artefact directory (`backbone.safetensors` + `metadata.json`);
- this project's training checkpoint (`kind` = `neco.contract.TRAINING_CHECKPOINT_KIND`);
- an official DINOv2 `.pth` state dict (torch-hub key naming, converted by timm's own filter);
- a NeCo Lightning `.ckpt` (module prefixes stripped through `STRIP_PREFIXES`);
- a timm model id (`vit_small_patch14_reg4_dinov2[.tag]`) read from the local HF cache, offline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from neco.contract import ARCHS, ARTEFACT_WEIGHTS, TRAINING_CHECKPOINT_KIND, ModelContract, arch_spec
from neco.model.artefact import config_hash, read_artefact_contract, verify_artefact_weights, verify_checksum
from neco.model.errors import ArchitectureMismatchError, WeightsError

log = logging.getLogger(__name__)

STRIP_PREFIXES: tuple[str, ...] = (
    "module.",
    "model.",
    "student.",
    "backbone.",
    "feature_extractor.",
    "encoder.",
    "_orig_mod.",
)
"""Wrapper prefixes (DDP, Lightning, NeCo's student/backbone modules, torch.compile) removed
from checkpoint keys until a backbone key remains."""

SKIP_PREFIXES: tuple[str, ...] = ("teacher.", "momentum_encoder.", "ema.")
"""Sub-trees that hold a second copy of the backbone; loading the student never reads them."""

_DINOV2_ONLY_KEYS = ("mask_token", "register_tokens")


def create_backbone(arch: str, *, pretrained: bool = False, drop_path_rate: float = 0.0) -> VisionTransformer:
    """Build a timm DINOv2 ViT that accepts any multiple-of-14 input size.

    `pretrained=True` reads the timm weights from the local Hugging Face cache only; it never
    downloads (see `_cached_pretrained_file`).
    """
    name, _, tag = arch.partition(".")
    arch_spec(name)
    kwargs: dict[str, Any] = {"dynamic_img_size": True, "drop_path_rate": drop_path_rate, "num_classes": 0}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    weights = _cached_pretrained_file(arch if tag else name)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)


def _cached_pretrained_file(model_id: str) -> Path:
    """Locate timm's pretrained weights for `model_id` in the HF cache without network access."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_id)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(f"timm has no pretrained weights registered for {model_id!r}")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    raise FileNotFoundError(
        f"pretrained weights for {model_id!r} ({cfg.hf_hub_id}) are not in the local Hugging Face "
        "cache; this project never downloads them: copy the cache in or pass a weight file"
    )


def freeze_all_but_last_blocks(model: VisionTransformer, k: int | None) -> None:
    """Train only the last `k` transformer blocks and the final norm (`None` trains everything).

    Embeddings and earlier blocks stop receiving gradients, which saves memory and keeps the
    low-level DINOv2 features intact when only a light post-pretraining is wanted.
    """
    if k is None:
        return
    depth = len(model.blocks)
    if not 0 <= k <= depth:
        raise ValueError(f"train_last_blocks={k} is outside 0..{depth} for this backbone")
    for param in model.parameters():
        param.requires_grad_(False)
    for block in list(model.blocks)[depth - k :]:
        block.requires_grad_(True)
    if k > 0:
        model.norm.requires_grad_(True)


# --------------------------------------------------------------------------- state-dict loading
def _infer_arch(state: Mapping[str, Tensor]) -> str:
    """Derive the timm architecture name from a (timm- or DINOv2-named) state dict."""
    if "patch_embed.proj.weight" not in state:
        raise WeightsError("state dict has no 'patch_embed.proj.weight': not a DINOv2 backbone")
    dim = state["patch_embed.proj.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    registers = "reg_token" in state or "register_tokens" in state
    for name, spec in ARCHS.items():
        if spec.embed_dim == dim and spec.depth == depth and (spec.num_registers > 0) == registers:
            return name
    raise ArchitectureMismatchError(
        f"no known DINOv2 architecture has width {dim}, depth {depth}, registers={registers}"
    )


def _strip_wrappers(state: Mapping[str, Any], roots: set[str]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove wrapper prefixes; return backbone-named tensors and the keys that are not backbone."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    foreign: list[str] = []
    for key, value in state.items():
        if not isinstance(value, Tensor) or key.startswith(SKIP_PREFIXES):
            continue
        name = key
        while True:
            if name.split(".")[0] in roots:
                break
            stripped = next((name[len(p) :] for p in STRIP_PREFIXES if name.startswith(p)), None)
            if stripped is None or stripped.startswith(SKIP_PREFIXES):
                name = ""
                break
            name = stripped
        if not name:
            foreign.append(key)
            continue
        if name in out:
            raise WeightsError(f"checkpoint keys {origin[name]!r} and {key!r} both map to {name!r}")
        out[name], origin[name] = value, key
    return out, foreign


def _to_timm_naming(state: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Convert official DINOv2 (torch hub) naming with timm's own checkpoint filter."""
    if not any(k in state for k in _DINOV2_ONLY_KEYS) and not any(".mlp.w12." in k for k in state):
        return state
    if "mask_token" not in state:  # timm's filter recognises DINOv2 checkpoints by this key
        state = {**state, "mask_token": torch.zeros(1, model.embed_dim)}
    if "register_tokens" in state and "pos_embed" in state:
        expected = model.pos_embed.shape[1] + 1
        if state["pos_embed"].shape[1] != expected:
            raise ArchitectureMismatchError(
                f"pos_embed has {state['pos_embed'].shape[1]} tokens, {model.__class__.__name__} "
                f"with registers expects {expected} (class token + {model.pos_embed.shape[1]} patches)"
            )
    return checkpoint_filter_fn(dict(state), model)


def load_state_into(model: VisionTransformer, raw: Mapping[str, Any], source: str) -> None:
    """Load a raw checkpoint mapping into `model`, reporting every discrepancy by name.

    Shape mismatches mean another architecture and are refused; missing backbone keys are
    refused (a partially loaded backbone would silently serve random features); keys that are
    not part of the backbone (heads, optimiser leftovers) are logged and ignored.
    """
    roots = {k.split(".")[0] for k in model.state_dict()} | set(_DINOV2_ONLY_KEYS)
    state, foreign = _strip_wrappers(raw, roots)
    if model.reg_token is not None and not {"reg_token", "register_tokens"} & set(state):
        raise ArchitectureMismatchError(
            f"{source}: no register tokens in the checkpoint, but {model.num_reg_tokens} are required; "
            "load it as the matching architecture without registers"
        )
    state = _to_timm_naming(state, model)
    target = model.state_dict()
    for key, value in state.items():
        if key in target and tuple(value.shape) != tuple(target[key].shape):
            raise ArchitectureMismatchError(
                f"{source}: {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target[key].shape)}; the weights belong to another architecture"
            )
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target)) + foreign
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise WeightsError(f"{source}: {len(missing)} backbone weights are missing: {shown}")
    if unexpected:
        log.warning("%s: ignoring %d non-backbone keys: %s", source, len(unexpected), ", ".join(unexpected[:8]))
    model.load_state_dict({k: state[k] for k in target}, strict=True)


# --------------------------------------------------------------------------- entry point
def load_backbone(source: str | Path, arch: str | None = None) -> tuple[VisionTransformer, ModelContract]:
    """Load a backbone from any supported source; returns (model in eval mode on CPU, contract)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        contract = read_artefact_contract(path)
        verify_artefact_weights(path)
        _check_arch(arch, contract.arch, str(path))
        model = create_backbone(contract.arch)
        load_state_into(model, load_file(str(path / ARTEFACT_WEIGHTS)), str(path))
        return model.eval(), contract
    if path.is_file():
        return _load_file(path, arch)
    name = str(source).partition(".")[0]
    if name in ARCHS:
        _check_arch(arch, name, str(source))
        return create_backbone(str(source), pretrained=True).eval(), ModelContract.for_arch(name)
    raise FileNotFoundError(f"weight source {str(source)!r} is neither a file, an artefact dir nor a timm DINOv2 id")


def _check_arch(requested: str | None, found: str, source: str) -> None:
    if requested is not None and requested != found:
        raise ArchitectureMismatchError(f"{source} holds a {found} backbone, not the requested {requested}")


def _load_file(path: Path, arch: str | None) -> tuple[VisionTransformer, ModelContract]:
    """Training checkpoint, Lightning .ckpt or plain (.pth) state dict, told apart by content."""
    verify_checksum(path, required=False)  # training checkpoints carry a .sha256 sidecar
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors carry many types; all mean "not loadable safely"
        raise WeightsError(f"{path}: cannot be read with torch.load(weights_only=True): {exc}") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a mapping of tensors, got {type(obj).__name__}")
    training_hash = ""
    if obj.get("kind") == TRAINING_CHECKPOINT_KIND:
        state = {k[len("backbone.") :]: v for k, v in obj["student"].items() if k.startswith("backbone.")}
        found = str(obj["arch"])
        training_hash = config_hash(obj["config"])
    else:
        state = obj.get("state_dict", obj)
        if not isinstance(state, Mapping):
            raise WeightsError(f"{path}: 'state_dict' entry is not a mapping")
        roots = {"patch_embed", "blocks", "cls_token", "pos_embed", "norm", *_DINOV2_ONLY_KEYS, "reg_token"}
        # An explicit arch wins: the shape checks in `load_state_into` then refuse wrong weights.
        found = arch or _infer_arch(_strip_wrappers(state, roots)[0])
    _check_arch(arch, found, str(path))
    model = create_backbone(found)
    load_state_into(model, state, str(path))
    return model.eval(), ModelContract.for_arch(found, training_hash=training_hash)
