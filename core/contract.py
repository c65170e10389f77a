"""The one shared contract between training, export, serving, client and evaluation.

Every stage imports its constants from here so that a model trained by `neco.training`,
exported by `neco.export`, served by `neco.serving` and queried by `neco.client` agree on
patch size, feature width, normalisation, tensor names and file formats. This module must
stay torch-free (the client extra does not install torch) and small.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

PATCH_SIZE: int = 14
"""Every DINOv2 backbone uses 14x14-pixel patches; inputs must be multiples of this."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""DINOv2 was pretrained with ImageNet statistics; exported graphs normalise with these."""

IGNORE_INDEX: int = 255
"""Mask value meaning "no label" in support masks and evaluation datasets."""

# --- Served tensors (ONNX graph, Triton model config, PyTriton bindings, client) -------------
INPUT_IMAGES: str = "images"
"""UINT8 [B, H, W, 3] RGB; H and W are multiples of PATCH_SIZE."""
OUTPUT_FEATURES: str = "features"
"""FP32 [B, H/14, W/14, C], L2-normalised per patch."""
OUTPUT_FEATURES_RAW: str = "features_raw"
"""FP32 [B, H/14, W/14, C], the backbone's final-norm patch tokens before normalisation."""
OUTPUT_CLS: str = "cls_token"
"""FP32 [B, C], the final-norm class token."""
OUTPUTS: tuple[str, ...] = (OUTPUT_FEATURES, OUTPUT_FEATURES_RAW, OUTPUT_CLS)

DEFAULT_MODEL_NAME: str = "neco_dinov2"
"""Triton model name used by export, serving and the client unless configured otherwise."""

# --- Retrieval defaults (the Hummingbird protocol); every stage and the CLI read these -----
DEFAULT_K: int = 30
"""Nearest support patches per query patch."""
DEFAULT_TEMPERATURE: float = 0.02
"""Softmax temperature over the k cosine similarities (called beta in the Hummingbird paper)."""
DEFAULT_INPUT_SIZE: int = 448
"""Input side (pixels) of support and query images."""

# --- File formats ----------------------------------------------------------------------------
ARTEFACT_WEIGHTS: str = "backbone.safetensors"
ARTEFACT_METADATA: str = "metadata.json"
ARTEFACT_FORMAT_VERSION: int = 1
"""Training's export artefact: timm-named backbone weights + JSON metadata (a `ModelContract`)."""

TRAINING_CHECKPOINT_KIND: str = "neco-training-checkpoint"
"""Value of the `kind` entry that marks training checkpoints (written by training, read by `neco.model`)."""

BANK_FORMAT_VERSION: int = 2
"""On-disk memory-bank format written by `neco.client`; readers refuse newer versions.
Version 2 adds the optional fitted NECO novelty subspace; version 1 banks still load."""

CONTRACT_PARAMETER_PREFIX: str = "neco_"
"""Triton model-config `parameters` keys carrying the contract start with this prefix."""


class ArchSpec(BaseModel):
    """Static facts about one DINOv2 architecture, independent of its weights."""

    model_config = ConfigDict(frozen=True)

    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    num_registers: int


def _spec(size: str, dim: int, depth: int, heads: int, registers: int) -> ArchSpec:
    reg = "_reg4" if registers else ""
    return ArchSpec(
        timm_name=f"vit_{size}_patch14{reg}_dinov2",
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_registers=registers,
    )


ARCHS: dict[str, ArchSpec] = {
    spec.timm_name: spec
    for size, dim, depth, heads in (
        ("small", 384, 12, 6),
        ("base", 768, 12, 12),
        ("large", 1024, 24, 16),
        ("giant", 1536, 40, 24),
    )
    for spec in (_spec(size, dim, depth, heads, 0), _spec(size, dim, depth, heads, 4))
}
"""The supported backbones, keyed by their timm model name."""


def arch_spec(arch: str) -> ArchSpec:
    """Look up an architecture, failing with the list of known names."""
    try:
        return ARCHS[arch]
    except KeyError:
        known = ", ".join(sorted(ARCHS))
        raise ValueError(f"unknown architecture {arch!r}; known: {known}") from None


class ModelContract(BaseModel):
    """What a consumer must know about a served encoder to use its features correctly.

    Written by training into the artefact metadata, by export into the Triton model config
    `parameters`, and into every memory-bank manifest, so a bank built with one model is
    never silently queried with another.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    patch_size: int = PATCH_SIZE
    embed_dim: int
    num_registers: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    training_hash: str = Field(default="", description="hash of the training config, '' for stock weights")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        arch_spec(value)
        return value

    @classmethod
    def for_arch(cls, arch: str, training_hash: str = "") -> ModelContract:
        spec = arch_spec(arch)
        return cls(
            arch=arch,
            embed_dim=spec.embed_dim,
            num_registers=spec.num_registers,
            training_hash=training_hash,
        )

    def compatible_with(self, other: ModelContract) -> bool:
        """Features are interchangeable only between identical encoders and preprocessing."""
        return self == other

    def to_parameters(self) -> dict[str, str]:
        """Flatten into Triton model-config `parameters` (string values only)."""
        return {
            f"{CONTRACT_PARAMETER_PREFIX}{key}": json.dumps(value) if not isinstance(value, str) else value
            for key, value in self.model_dump().items()
        }

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> ModelContract:
        """Inverse of `to_parameters`; raises ValueError naming what is missing or malformed."""
        values: dict[str, object] = {}
        for name, field in cls.model_fields.items():
            key = f"{CONTRACT_PARAMETER_PREFIX}{name}"
            if key not in params:
                if field.is_required():
                    raise ValueError(f"model parameters lack {key!r}; not a NeCo-exported model?")
                continue
            raw = params[key]
            values[name] = raw if field.annotation is str else json.loads(raw)
        return cls.model_validate(values)
