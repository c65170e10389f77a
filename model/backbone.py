"""DINO backbones (every `neco.contract.ARCHS` entry): creation through timm and loading from
every supported weight format.

DINOv2 architectures are timm `VisionTransformer`s (learned position embeddings, interpolated
per input size); DINOv3 ones are timm `Eva`s (RoPE recomputed per patch grid). Both accept any
input whose sides are multiples of their patch size (`dynamic_img_size`).

Supported sources for `load_backbone`:
- this project's artefact directory (`backbone.safetensors` + `metadata.json`);
- this project's training checkpoint (`kind` = `neco.contract.TRAINING_CHECKPOINT_KIND`);
- a state dict (`.pth`, `.pt`, `.bin` or a bare `.safetensors` file) in timm naming, official
  DINOv2 (torch hub) naming or Meta's DINOv3 naming (`storage_tokens`, `ls1.gamma`), the last
  two converted by timm's own checkpoint filters;
- a NeCo Lightning `.ckpt` (module prefixes stripped through `STRIP_PREFIXES`);
- a timm model id (`vit_small_patch14_reg4_dinov2[.tag]`, `vit_small_patch16_dinov3.lvd1689m`)
  read from the local HF cache, offline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models import eva, vision_transformer
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from neco.contract import (
    ARCHS,
    ARTEFACT_METADATA,
    ARTEFACT_WEIGHTS,
    TRAINING_CHECKPOINT_KIND,
    ModelContract,
    split_model_id,
    supported_arch_spec,
)
from neco.model.artefact import config_hash, read_artefact_contract, verify_artefact_weights, verify_checksum
from neco.model.errors import ArchitectureMismatchError, WeightsError

log = logging.getLogger(__name__)

_NON_PERSISTENT = {"rope.periods"}
"""Buffers timm derives from the architecture (DINOv3's RoPE periods), not from the weights."""

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

Backbone = VisionTransformer | Eva
"""The timm classes behind the registered architectures (DINOv2: ViT, DINOv3: Eva)."""

_UPSTREAM_ONLY_KEYS = ("mask_token", "register_tokens", "storage_tokens", "rope_embed", "local_cls_norm")
"""Top-level names of the official DINOv2/DINOv3 state dicts that timm's naming lacks or renames."""


def create_backbone(arch: str, *, pretrained: bool = False, drop_path_rate: float = 0.0) -> Backbone:
    """Build a timm backbone that accepts any input whose sides are multiples of its patch size.

    `arch` is a registered timm name, optionally with a pretrained tag; listed-but-refused
    architectures (DINOv3 7B) fail here with the reason. `pretrained=True` reads the timm
    weights from the local Hugging Face cache only; it never downloads (see
    `_cached_pretrained_file`).
    """
    supported_arch_spec(arch)
    name, tag = split_model_id(arch)
    kwargs: dict[str, Any] = {"dynamic_img_size": True, "drop_path_rate": drop_path_rate, "num_classes": 0}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    model_id = arch if tag else name
    weights = _cached_pretrained_file(model_id)
    return timm.create_model(model_id, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)


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


def num_registers(model: Backbone) -> int:
    """Register tokens of a timm DINOv2 ViT or DINOv3 Eva (prefix tokens minus the class token)."""
    return int(model.num_prefix_tokens) - (0 if model.cls_token is None else 1)


def freeze_all_but_last_blocks(model: Backbone, k: int | None) -> None:
    """Train only the last `k` transformer blocks and the final norm (`None` trains everything).

    Embeddings and earlier blocks stop receiving gradients, which saves memory and keeps the
    low-level DINO features intact when only a light post-pretraining is wanted.
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
def _is_swiglu(state: Mapping[str, Tensor]) -> bool:
    """SwiGLU MLPs in any naming (upstream `w12`/`w1`, timm `fc1_g`)."""
    return any(".mlp.w12." in k or ".mlp.w1." in k or ".mlp.fc1_g." in k for k in state)


def _infer_arch(state: Mapping[str, Tensor]) -> str:
    """Derive the registered architecture from a (timm-, DINOv2- or DINOv3-named) state dict.

    Patch size, width, depth and registers single out an architecture except where two
    differ only in their MLP (DINOv3 S and S+), which the SwiGLU keys then decide.
    """
    if "patch_embed.proj.weight" not in state:
        raise WeightsError("state dict has no 'patch_embed.proj.weight': not a DINO backbone")
    proj = state["patch_embed.proj.weight"]
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    registers = bool({"reg_token", "register_tokens", "storage_tokens"} & set(state))
    found = [
        spec
        for spec in ARCHS.values()
        if (spec.patch_size, spec.embed_dim, spec.depth, spec.num_registers > 0) == (patch, dim, depth, registers)
    ]
    if len(found) > 1:
        mlp = "swiglu" if _is_swiglu(state) else "mlp"
        found = [spec for spec in found if spec.mlp == mlp]
    if len(found) != 1:
        raise ArchitectureMismatchError(
            f"no single registered architecture has patch {patch}, width {dim}, depth {depth}, registers={registers}"
        )
    return found[0].timm_name


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


def _to_timm_naming(state: dict[str, Tensor], model: Backbone) -> dict[str, Tensor]:
    """Convert official DINOv2 (torch hub) or DINOv3 (Meta) naming with timm's own checkpoint filters."""
    if isinstance(model, Eva):
        return _dinov3_to_timm(state, model) if "storage_tokens" in state else state
    if not any(k in state for k in ("mask_token", "register_tokens")) and not any(".mlp.w12." in k for k in state):
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
    return vision_transformer.checkpoint_filter_fn(dict(state), model)


def _dinov3_to_timm(state: dict[str, Tensor], model: Eva) -> dict[str, Tensor]:
    """Meta's DINOv3 naming -> timm's Eva naming, through timm's `eva.checkpoint_filter_fn`.

    Upstream checkpoints carry a `qkv.bias` whose key third is masked to zero; timm builds the
    S/S+/B/L/H+ models without q/v biases (the released ones are all zero). timm's filter drops
    such a bias with a print; here it is dropped only when it is zero, and a non-zero one is
    refused, since dropping it would change the features.
    """
    has_qv_bias = any(k.endswith(".attn.q_bias") for k in model.state_dict())
    if not has_qv_bias:
        for key in [k for k in state if k.endswith(".attn.qkv.bias")]:
            if torch.count_nonzero(state[key]):
                raise ArchitectureMismatchError(
                    f"{key} is not zero, but {model.__class__.__name__} has no q/v biases; "
                    "this checkpoint needs timm's `_qkvb` variant, which this project does not register"
                )
        state = {k: v for k, v in state.items() if not k.endswith(".attn.qkv.bias")}
    return eva.checkpoint_filter_fn(dict(state), model)


def load_state_into(model: Backbone, raw: Mapping[str, Any], source: str) -> None:
    """Load a raw checkpoint mapping into `model`, reporting every discrepancy by name.

    Shape mismatches mean another architecture and are refused; missing backbone keys are
    refused (a partially loaded backbone would silently serve random features); keys that are
    not part of the backbone (heads, optimiser leftovers, upstream buffers such as
    `rope_embed.periods`) are logged and ignored.
    """
    roots = {k.split(".")[0] for k in model.state_dict()} | set(_UPSTREAM_ONLY_KEYS)
    state, foreign = _strip_wrappers(raw, roots)
    if model.reg_token is not None and not {"reg_token", "register_tokens", "storage_tokens"} & set(state):
        raise ArchitectureMismatchError(
            f"{source}: no register tokens in the checkpoint, but {num_registers(model)} are required; "
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
    missing = sorted(set(target) - set(state) - _NON_PERSISTENT)
    unexpected = sorted(set(state) - set(target)) + foreign
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise WeightsError(f"{source}: {len(missing)} backbone weights are missing: {shown}")
    if unexpected:
        log.warning("%s: ignoring %d non-backbone keys: %s", source, len(unexpected), ", ".join(unexpected[:8]))
    model.load_state_dict({k: state.get(k, target[k]) for k in target}, strict=True)


# --------------------------------------------------------------------------- entry point
def load_backbone(source: str | Path, arch: str | None = None) -> tuple[Backbone, ModelContract]:
    """Load a backbone from any supported source; returns (model in eval mode on CPU, contract).

    `arch` (a registered name, optionally tagged: `vit_large_patch16_dinov3.sat493m`) is
    checked against what the source holds; for bare state dicts its tag also selects the
    normalisation the weights were trained with.
    """
    path = Path(source)
    if path.is_file() and path.name == ARTEFACT_WEIGHTS and (path.parent / ARTEFACT_METADATA).is_file():
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
    name, _ = split_model_id(str(source))
    if name in ARCHS:
        _check_arch(arch, name, str(source))
        return create_backbone(str(source), pretrained=True).eval(), ModelContract.for_arch(str(source))
    raise FileNotFoundError(
        f"weight source {str(source)!r} is neither a file, an artefact dir nor a registered timm id"
    )


def _check_arch(requested: str | None, found: str, source: str) -> None:
    if requested is not None and split_model_id(requested)[0] != split_model_id(found)[0]:
        raise ArchitectureMismatchError(f"{source} holds a {found} backbone, not the requested {requested}")


def _read_state_file(path: Path) -> Mapping[str, Any]:
    """A checkpoint file as a mapping: safetensors by name, anything else through safe torch.load."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors carry many types; all mean "not loadable safely"
        raise WeightsError(f"{path}: cannot be read with torch.load(weights_only=True): {exc}") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a mapping of tensors, got {type(obj).__name__}")
    return obj


def _load_file(path: Path, arch: str | None) -> tuple[Backbone, ModelContract]:
    """Training checkpoint, Lightning .ckpt or plain (.pth/.safetensors) state dict, told apart by content."""
    verify_checksum(path, required=False)  # training checkpoints carry a .sha256 sidecar
    obj = _read_state_file(path)
    training_hash = ""
    if obj.get("kind") == TRAINING_CHECKPOINT_KIND:
        state = {k[len("backbone.") :]: v for k, v in obj["student"].items() if k.startswith("backbone.")}
        found = str(obj["arch"])
        training_hash = config_hash(obj["config"])
    else:
        state = obj.get("state_dict", obj)
        if not isinstance(state, Mapping):
            raise WeightsError(f"{path}: 'state_dict' entry is not a mapping")
        roots = {"patch_embed", "blocks", "cls_token", "pos_embed", "norm", "reg_token", *_UPSTREAM_ONLY_KEYS}
        # An explicit arch wins: the shape checks in `load_state_into` then refuse wrong weights.
        found = arch or _infer_arch(_strip_wrappers(state, roots)[0])
    _check_arch(arch, found, str(path))
    model = create_backbone(found)
    load_state_into(model, state, str(path))
    return model.eval(), ModelContract.for_arch(found, training_hash=training_hash)
