"""The one shared contract between training, export, serving, client and evaluation.

Every stage imports its constants from here so that a model trained by `neco.training`,
exported by `neco.export`, served by `neco.serving` and queried by `neco.client` agree on
patch size, feature width, normalisation, tensor names and file formats. This module must
stay torch-free (the client extra does not install torch) and small.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from neco.errors import InputError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet statistics: the normalisation of DINOv2's and DINOv3's LVD weights. A dataset fact,
not a model default: every stage reads the mean/std of the model it holds (`ModelContract`)."""

SAT493M_MEAN: tuple[float, float, float] = (0.430, 0.411, 0.296)
SAT493M_STD: tuple[float, float, float] = (0.213, 0.156, 0.143)
"""Statistics of DINOv3's satellite pretraining set (weights tagged `.sat493m`)."""

IGNORE_INDEX: int = 255
"""Mask value meaning "no label" in support masks and evaluation datasets."""

# --- Served tensors (ONNX graph, Triton model config, PyTriton bindings, client) -------------
INPUT_IMAGES: str = "images"
"""UINT8 [B, H, W, 3] RGB; H and W are multiples of the served model's patch size."""
OUTPUT_FEATURES: str = "features"
"""FP32 [B, H/p, W/p, C] (p: the model's patch size), L2-normalised per patch."""
OUTPUT_FEATURES_RAW: str = "features_raw"
"""FP32 [B, H/p, W/p, C], the backbone's final-norm patch tokens before normalisation."""
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


class UnsupportedArchitectureError(InputError):
    """A registered architecture this project lists but refuses to build (e.g. DINOv3 7B)."""


Family = Literal["dinov2", "dinov3"]
Positions = Literal["learned", "rope"]


class ArchSpec(BaseModel):
    """Static facts about one backbone architecture, independent of its weights.

    Everything a stage needs to feed the model and read its tokens is here, so no stage
    assumes one family: the patch size sets the input grid, `num_prefix_tokens` says how many
    tokens precede the patch grid, `position` says whether inputs of any size need
    interpolated learned embeddings (DINOv2) or recomputed rotary ones (DINOv3).
    """

    model_config = ConfigDict(frozen=True)

    timm_name: str
    family: Family
    embed_dim: int
    depth: int
    num_heads: int
    num_registers: int
    patch_size: int
    position: Positions
    mlp: Literal["mlp", "swiglu"] = "mlp"
    params_m: float = Field(description="parameters in millions, as published")
    weight_tags: tuple[str, ...] = Field(description="timm pretrained tags (normalisation per tag: TAG_NORMALISATION)")
    licence: str
    refused: str = Field("", description="why the project refuses to build it; '' = supported")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch grid: the class token and the registers."""
        return 1 + self.num_registers


TAG_NORMALISATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sat493m": (SAT493M_MEAN, SAT493M_STD),
}
"""(mean, std) of pretrained weight tags that do not use ImageNet statistics."""

_DINOV2_SIZES = (  # size, width, depth, heads, params (M)
    ("small", 384, 12, 6, 21.0),
    ("base", 768, 12, 12, 86.0),
    ("large", 1024, 24, 16, 300.0),
    ("giant", 1536, 40, 24, 1100.0),
)
_DINOV3_SIZES = (  # size, width, depth, heads, mlp, params (M), tags
    ("small", 384, 12, 6, "mlp", 21.0, ("lvd1689m",)),
    ("small_plus", 384, 12, 6, "swiglu", 29.0, ("lvd1689m",)),
    ("base", 768, 12, 12, "mlp", 86.0, ("lvd1689m",)),
    ("large", 1024, 24, 16, "mlp", 300.0, ("lvd1689m", "sat493m")),
    ("huge_plus", 1280, 32, 20, "swiglu", 840.0, ("lvd1689m",)),
    ("7b", 4096, 40, 32, "swiglu", 6700.0, ("lvd1689m", "sat493m")),
)
_REFUSED_7B = (
    "DINOv3 7B (6.7B parameters, 27 GB of FP32 weights) is beyond what this project is sized and "
    "tested for: the FP32 ONNX export and its PyTorch parity check hold the weights twice (> 54 GB "
    "of host memory), and its serving and TensorRT builds were never tried; use a distilled DINOv3 "
    "(S, S+, B, L, H+) instead"
)


def _dinov2_specs() -> list[ArchSpec]:
    return [
        ArchSpec(
            timm_name=f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2",
            family="dinov2",
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            num_registers=registers,
            patch_size=14,
            position="learned",
            mlp="swiglu" if size == "giant" else "mlp",
            params_m=params,
            weight_tags=("lvd142m",),
            licence="Apache-2.0",
        )
        for size, dim, depth, heads, params in _DINOV2_SIZES
        for registers in (0, 4)
    ]


def _dinov3_specs() -> list[ArchSpec]:
    return [
        ArchSpec(
            timm_name=f"vit_{size}_patch16_dinov3",
            family="dinov3",
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            num_registers=4,
            patch_size=16,
            position="rope",
            mlp=mlp,
            params_m=params,
            weight_tags=tags,
            licence="DINOv3 License",
            refused=_REFUSED_7B if size == "7b" else "",
        )
        for size, dim, depth, heads, mlp, params, tags in _DINOV3_SIZES
    ]


ARCHS: dict[str, ArchSpec] = {spec.timm_name: spec for spec in (*_dinov2_specs(), *_dinov3_specs())}
"""Every registered backbone, keyed by its timm model name (timm style: `vit_<size>_patch<p>_<family>`)."""

DEFAULT_ARCH: str = "vit_small_patch14_reg4_dinov2"
"""The backbone used when a stage is not told which (the NeCo paper's ViT-S/14 with registers)."""


def registered_patch_sizes() -> tuple[int, ...]:
    """Patch sizes of the supported architectures (14, 16): what a size check uses before it
    knows the model (a config read before the weights, a gateway before it asks the server)."""
    return tuple(sorted({spec.patch_size for spec in ARCHS.values() if not spec.refused}))


def split_model_id(model_id: str) -> tuple[str, str]:
    """`vit_large_patch16_dinov3.sat493m` -> (`vit_large_patch16_dinov3`, `sat493m`); no tag -> ''."""
    name, _, tag = model_id.partition(".")
    return name, tag


def arch_spec(arch: str) -> ArchSpec:
    """Look up an architecture (a timm tag is allowed and ignored), failing with the known names."""
    name, _ = split_model_id(arch)
    try:
        return ARCHS[name]
    except KeyError:
        known = ", ".join(sorted(ARCHS))
        raise InputError(f"unknown architecture {arch!r}; known: {known}") from None


def supported_arch_spec(arch: str) -> ArchSpec:
    """`arch_spec`, refusing the listed-but-unsupported architectures with the reason."""
    spec = arch_spec(arch)
    if spec.refused:
        raise UnsupportedArchitectureError(f"{spec.timm_name} is listed but not supported: {spec.refused}")
    return spec


def tag_normalisation(model_id: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) the weights named by a timm id were trained with (ImageNet unless the tag says otherwise)."""
    spec = arch_spec(model_id)
    _, tag = split_model_id(model_id)
    if tag and tag not in spec.weight_tags:
        raise InputError(f"{spec.timm_name} has no pretrained tag {tag!r}; known: {', '.join(spec.weight_tags)}")
    return TAG_NORMALISATION.get(tag, (IMAGENET_MEAN, IMAGENET_STD))


_ARCH_FACTS = ("patch_size", "embed_dim", "num_registers", "family", "position")
"""Contract fields that are facts of the architecture: filled from the registry when absent
(artefacts and banks written before a field existed), and refused when they disagree with it."""


class ModelContract(BaseModel):
    """What a consumer must know about a served encoder to use its features correctly.

    Written by training into the artefact metadata, by export into the Triton model config
    `parameters`, and into every memory-bank manifest, so a bank built with one model is
    never silently queried with another. Every stage reads the patch size and normalisation
    from here, never from a module constant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    family: Family
    patch_size: int
    embed_dim: int
    num_registers: int
    position: Positions
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    training_hash: str = Field(default="", description="hash of the training config, '' for stock weights")

    @model_validator(mode="before")
    @classmethod
    def _fill_arch_facts(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("arch"), str):
            spec = supported_arch_spec(data["arch"])
            data = {**{name: getattr(spec, name) for name in _ARCH_FACTS}, **data}
        return data

    @model_validator(mode="after")
    def _facts_agree(self) -> ModelContract:
        spec = arch_spec(self.arch)
        wrong = [
            f"{n}={getattr(self, n)!r} (expected {getattr(spec, n)!r})"
            for n in _ARCH_FACTS
            if getattr(self, n) != getattr(spec, n)
        ]
        if wrong:
            raise ValueError(f"contract for {self.arch} disagrees with the architecture: {', '.join(wrong)}")
        if self.arch != spec.timm_name:
            raise ValueError(f"contract arch {self.arch!r} must be a timm name without tag ({spec.timm_name!r})")
        return self

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch grid (class token + registers)."""
        return 1 + self.num_registers

    @classmethod
    def for_arch(cls, arch: str, training_hash: str = "") -> ModelContract:
        """The contract of a registered architecture; a timm tag (`.sat493m`) selects its normalisation."""
        spec = supported_arch_spec(arch)
        mean, std = tag_normalisation(arch)
        return cls(arch=spec.timm_name, mean=mean, std=std, training_hash=training_hash)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch-grid size of an input of height x width pixels (both multiples of the patch size)."""
        if height <= 0 or width <= 0 or height % self.patch_size or width % self.patch_size:
            raise InputError(f"{height}x{width} px is not a positive multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def floor_to_patch(self, pixels: int) -> int:
        """The largest multiple of the patch size not above `pixels` (an input side for this model)."""
        if pixels < self.patch_size:
            raise InputError(f"input side {pixels} px is smaller than one {self.patch_size}-px patch of {self.arch}")
        return pixels - pixels % self.patch_size

    def differences(self, other: ModelContract) -> list[str]:
        """`field: mine != theirs` for every field that differs (empty: the same encoder)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

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
        """Inverse of `to_parameters`; raises ValueError naming what is missing or malformed.

        Only the architecture is required: configs exported before a field existed lack it,
        and the registry fills the architecture's facts (`_ARCH_FACTS`).
        """
        values: dict[str, object] = {}
        for name, field in cls.model_fields.items():
            key = f"{CONTRACT_PARAMETER_PREFIX}{name}"
            if key not in params:
                if name == "arch":
                    raise ValueError(f"model parameters lack {key!r}; not a NeCo-exported model?")
                continue
            raw = params[key]
            textual = field.annotation is str or get_origin(field.annotation) is Literal
            values[name] = raw if textual else json.loads(raw)
        return cls.model_validate(values)
