"""The training configuration: one pydantic model, validated completely before any work starts.

Unknown keys, wrong types and impossible values (a crop smaller than a patch or not a multiple
of it, a batch below one, a data folder that does not exist, ...) become a `ConfigError` naming
the key, through `neco.config.load_config`. Crop sizes are given in pixels but must be whole
numbers of the configured model's patches (14 px for DINOv2, 16 px for DINOv3): the loss's ROI
grids and the fg/bg masks live on the patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from neco.config import load_config
from neco.contract import ARCHS, DEFAULT_ARCH, arch_spec, split_model_id, supported_arch_spec

MIN_MASK_CELLS = 4
"""Smallest patch-map side the fg/bg mask's 7-tap reflect-padded blur accepts."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_patch_multiple(name: str, size: int, patch: int, arch: str) -> None:
    """Crops are whole patch grids of the model: `size` px must be k * `patch` px, k >= 1."""
    if size < patch:
        raise ValueError(f"crops.{name}={size} px is smaller than one {patch}-px patch of {arch}")
    if size % patch:
        below, above = size // patch * patch, (size // patch + 1) * patch
        raise ValueError(
            f"crops.{name}={size} px is not a multiple of the patch size {patch} of {arch} "
            f"({size / patch:.2f} patches); use {below} or {above} px"
        )


class ModelSection(_Section):
    arch: str = DEFAULT_ARCH
    weights: str | None = Field(None, description="load_backbone source; null = random init")
    keep_registers: bool = True
    train_last_blocks: int | None = Field(None, ge=0)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    head_hidden_dim: PositiveInt = 2048
    head_out_dim: PositiveInt = 256
    head_layers: PositiveInt = 3

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        supported_arch_spec(value)  # listed-but-refused architectures (DINOv3 7B) fail with the reason
        name, tag = split_model_id(value)
        if tag:
            raise ValueError(
                f"model.arch takes the timm name without a tag ({name!r}); give {value!r} as model.weights"
            )
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str | None) -> str | None:
        if value is not None and split_model_id(value)[0] not in ARCHS and not Path(value).exists():
            raise ValueError(f"weights {value!r} is neither an existing file/folder nor a registered timm id")
        return value

    @property
    def patch_size(self) -> int:
        """Pixels per patch side of the configured architecture."""
        return arch_spec(self.arch).patch_size

    @model_validator(mode="after")
    def _blocks(self) -> ModelSection:
        spec = arch_spec(self.arch)
        if spec.family != "dinov2" and not self.keep_registers:
            raise ValueError(
                f"model.keep_registers=false is for DINOv2 register models only; {self.arch} applies RoPE after "
                "a fixed number of prefix tokens, so its registers stay"
            )
        depth = spec.depth
        if self.train_last_blocks is not None and self.train_last_blocks > depth:
            raise ValueError(f"train_last_blocks={self.train_last_blocks} exceeds the depth {depth} of {self.arch}")
        return self


class DataSection(_Section):
    kind: Literal["folder", "scenes"] = "scenes"
    root: Path | None = Field(None, description="image folder (searched recursively) for kind=folder")
    scenes_count: PositiveInt = 256
    scenes_size: PositiveInt = 224
    scenes_classes: int = Field(4, ge=2)
    num_workers: int = Field(2, ge=0)
    prefetch_factor: PositiveInt = 4

    @model_validator(mode="after")
    def _root(self) -> DataSection:
        if self.kind == "folder":
            if self.root is None:
                raise ValueError("data.root is required when data.kind is 'folder'")
            if not self.root.is_dir():
                raise ValueError(f"data.root {str(self.root)!r} does not exist or is not a directory")
        return self


class CropSection(_Section):
    """Crop geometry and augmentation strengths; the single source of the views' defaults.

    Sizes are pixels; `TrainConfig` checks they are whole numbers of the model's patches.
    """

    global_size: PositiveInt = 224
    local_size: PositiveInt = 98
    num_local: int = Field(4, ge=0)
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_intersection: float = Field(0.01, ge=0.0, lt=1.0)
    flip_p: float = Field(0.0, ge=0.0, le=1.0, description="mirror probability per crop; the reference never flips")
    jitter_strength: float = Field(1.0, ge=0.0)
    blur_strength: float = Field(1.0, ge=0.0)

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float], info: Any) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"{info.field_name}={value} must satisfy 0 < low <= high <= 1")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"ratio={value} must satisfy 0 < low <= high")
        return value


class MethodSection(_Section):
    grid_size: PositiveInt = 7
    num_references: int = Field(49, ge=2)
    queue_length: PositiveInt = 8192
    queue_push_per_image: PositiveInt = 10
    similarity: Literal["cosine", "euclidean"] = "cosine"
    sort_network: str = "bitonic"
    student_steepness: PositiveFloat = 100.0
    teacher_steepness: PositiveFloat = 100.0
    art_lambda: float = Field(0.25, ge=0.0, le=0.5)
    distribution: str = "cauchy"
    reference_draw: Literal["pair", "global_crop"] = Field(
        "pair", description="a fresh reference set per (global crop, view) pair (the reference), or one per global crop"
    )
    mask_mode: Literal["all", "fg", "bg"] = "all"
    attention_threshold: float = Field(0.6, gt=0.0, le=1.0)
    mask_connectivity: Literal[4, 8] = Field(8, description="neighbourhood of the mask's small-component removal")
    teacher_momentum: float = Field(0.9995, ge=0.0, le=1.0)
    teacher_momentum_end: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("sort_network", "distribution")
    @classmethod
    def _sorter_choice(cls, value: str, info: Any) -> str:
        from neco.training.sorting import DISTRIBUTIONS, NETWORKS  # the sorter owns its choices

        choices = NETWORKS if info.field_name == "sort_network" else DISTRIBUTIONS
        if value not in choices:
            raise ValueError(f"{info.field_name}={value!r} is not one of {', '.join(choices)}")
        return value


class OptimSection(_Section):
    batch_size: PositiveInt = 64
    accumulation: PositiveInt = 1
    steps: PositiveInt | None = Field(None, description="optimiser steps; or give epochs")
    epochs: PositiveFloat | None = None
    backbone_lr: float = Field(1e-5, ge=0.0)
    head_lr: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.04, ge=0.0)
    weight_decay_end: float = Field(0.5, ge=0.0)
    clip_grad: PositiveFloat | None = Field(None, description="max gradient norm; null = no clipping (the reference)")

    @model_validator(mode="after")
    def _length(self) -> OptimSection:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of optim.steps and optim.epochs")
        return self


class RuntimeSection(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"
    compile: bool = False
    channels_last: bool = True
    threads: PositiveInt | None = None
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    tensorboard: bool = True
    progress: bool = True


class TrainConfig(_Section):
    """Everything a NeCo post-pretraining run needs; its JSON dump is hashed into the artefact."""

    seed: int = 0
    output_dir: Path = Path("outputs/train")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    crops: CropSection = CropSection()
    method: MethodSection = MethodSection()
    optim: OptimSection = OptimSection(steps=1)
    runtime: RuntimeSection = RuntimeSection()

    @model_validator(mode="after")
    def _cross(self) -> TrainConfig:
        patch, arch = self.model.patch_size, self.model.arch
        for name in ("global_size", "local_size"):
            _check_patch_multiple(name, getattr(self.crops, name), patch, arch)
        if self.crops.global_size < self.crops.local_size:
            raise ValueError(f"crops.global_size {self.crops.global_size} < crops.local_size {self.crops.local_size}")
        if self.method.mask_mode != "all" and self.crops.global_size < MIN_MASK_CELLS * patch:
            raise ValueError(
                f"method.mask_mode={self.method.mask_mode!r} needs crops.global_size >= {MIN_MASK_CELLS * patch} px:"
                f" the mask's 7-tap blur needs {MIN_MASK_CELLS}+ patches per side"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def total_steps(self, dataset_length: int, world_size: int = 1) -> int:
        """Optimiser steps of the run (epochs are converted with the global batch)."""
        if self.optim.steps is not None:
            return self.optim.steps
        assert self.optim.epochs is not None
        per_step = self.optim.batch_size * self.optim.accumulation * world_size
        return max(1, int(self.optim.epochs * dataset_length // per_step))


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML + `key=value` overrides -> TrainConfig, or `neco.config.ConfigError`."""
    return load_config(TrainConfig, path, overrides)
