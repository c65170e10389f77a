"""Pydantic configuration of the export stage (torch-free, so the CLI can validate cheaply).

Everything a reproducible export needs is in one `ExportConfig`: where the weights come from,
which precision is served, how parity is checked, how Triton batches and places the model,
and the TensorRT optimisation profile. Invalid values (sizes that are not multiples of the
patch size, inconsistent profiles) are rejected here, before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neco.contract import DEFAULT_MODEL_NAME, arch_spec, registered_patch_sizes
from neco.export.errors import ProfileError

Size = tuple[int, int]
"""(height, width) in pixels; both multiples of the patch size."""

Precision = Literal["fp32", "fp16", "bf16", "int8"]
"""Served precision. onnxruntime: fp32, fp16, int8. TensorRT: fp32, fp16, bf16, taken from the
ONNX the engine is parsed from (strongly typed builds; see neco.export.tensorrt_build)."""


def check_size(size: Size, what: str, patch_size: int | None = None) -> Size:
    """Refuse image sizes the patch grid cannot tile exactly (the graph would crop silently).

    With the model's `patch_size` the check is exact. Without it (a config read before the
    weights are), a size must suit at least one registered patch size; `export_model` then
    checks every size again against the model it exports (`check_sizes`).
    """
    height, width = size
    patches = (patch_size,) if patch_size else registered_patch_sizes()
    if height <= 0 or width <= 0 or all(height % p or width % p for p in patches):
        allowed = " or ".join(str(p) for p in patches)
        raise ProfileError(f"{what} {height}x{width} must be positive multiples of the patch size {allowed}")
    return size


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OnnxSettings(_Section):
    """How the FP32 ONNX graph is produced."""

    opset: int = Field(default=18, ge=18, description="18+ keeps LayerNormalization one node and has Resize antialias")
    example_size: Size = (224, 224)
    example_batch: int = Field(default=2, ge=2, description="torch.export specialises dimensions of size 1")
    simplify: bool = Field(default=True, description="run onnxslim (parity is re-checked afterwards)")

    @field_validator("example_size")
    @classmethod
    def _multiple(cls, value: Size) -> Size:
        return check_size(value, "onnx.example_size")


class ParitySettings(_Section):
    """Which shapes the exported graph is checked at, against PyTorch, from the one file."""

    enabled: bool = True
    sizes: list[Size] = Field(
        default_factory=lambda: [(224, 224), (448, 336), (336, 224), (224, 448)],
        description="multiples of 112 suit both patch 14 (DINOv2) and 16 (DINOv3)",
    )
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 3])
    atol: float = Field(default=1e-3, gt=0, description="max abs difference on normalised features")
    min_cosine_fp16: float = Field(default=0.99, gt=0, le=1)
    min_cosine_int8: float = Field(default=0.98, gt=0, le=1)
    seed: int = 0
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime providers for the exported graphs, e.g. [CUDAExecutionProvider, CPUExecutionProvider]",
    )

    @field_validator("sizes")
    @classmethod
    def _multiples(cls, value: list[Size]) -> list[Size]:
        return [check_size(size, "parity.sizes entry") for size in value]

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError("parity.batch_sizes must be a non-empty list of positive integers")
        return value


class QuantizationSettings(_Section):
    """INT8 conversion through onnxruntime.quantization."""

    mode: Literal["dynamic", "static"] = "dynamic"
    calibration_dir: Optional[Path] = Field(default=None, description="user images; generated scenes if unset")
    calibration_images: int = Field(default=16, ge=1)
    calibration_size: Size = (224, 224)

    @field_validator("calibration_size")
    @classmethod
    def _multiple(cls, value: Size) -> Size:
        return check_size(value, "quantization.calibration_size")


class TritonSettings(_Section):
    """Scheduling and placement written into config.pbtxt."""

    max_batch_size: int = Field(default=8, ge=1)
    preferred_batch_sizes: list[int] = Field(default_factory=lambda: [4, 8])
    max_queue_delay_us: int = Field(default=2000, ge=0)
    max_queue_size: int = Field(default=64, ge=1, description="bounded queue: excess requests are rejected")
    instance_kind: Literal["KIND_GPU", "KIND_CPU"] = "KIND_GPU"
    instance_count: int = Field(default=1, ge=1)
    gpus: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _preferred_within_max(self) -> TritonSettings:
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"triton.preferred_batch_sizes {bad} exceed max_batch_size {self.max_batch_size}")
        if self.gpus and self.instance_kind != "KIND_GPU":
            raise ValueError("triton.gpus only applies to instance_kind KIND_GPU")
        return self


Shape = tuple[int, int, int]
"""(batch, height, width) of one TensorRT profile point."""


def validate_profile(minimum: Shape, optimum: Shape, maximum: Shape, patch_size: int | None = None) -> None:
    """A TensorRT profile needs min <= opt <= max per axis and patch-aligned image sides."""
    for label, (batch, height, width) in (("min", minimum), ("opt", optimum), ("max", maximum)):
        if batch < 1:
            raise ProfileError(f"tensorrt profile {label} batch {batch} must be >= 1")
        check_size((height, width), f"tensorrt profile {label} size", patch_size)
    for axis, name in enumerate(("batch", "height", "width")):
        if not minimum[axis] <= optimum[axis] <= maximum[axis]:
            raise ProfileError(
                f"tensorrt profile {name}: need min <= opt <= max, got "
                f"{minimum[axis]} / {optimum[axis]} / {maximum[axis]}"
            )


class TensorRTSettings(_Section):
    """Engine build options (used only when `backend` is "tensorrt").

    There is no precision switch here: engines are strongly typed, so the top-level
    `precision` picks which ONNX (FP32, or the FP16/BF16 graph the export writes) is parsed.
    """

    min_shape: Shape = (1, 224, 224)
    opt_shape: Shape = (4, 448, 448)
    max_shape: Shape = (8, 896, 896)
    workspace_gib: float = Field(default=4.0, gt=0)
    timing_cache: Optional[Path] = Field(default=None, description="reused across builds to cut build time")
    engine_cache_dir: Optional[Path] = Field(default=None, description="keep named engines here as well")

    @model_validator(mode="before")
    @classmethod
    def _no_precision_flags(cls, data: object) -> object:
        if isinstance(data, dict) and {"fp16", "bf16"} & data.keys():
            raise ValueError(
                "tensorrt.fp16/bf16 are gone (TensorRT 11 has no precision flags; engines are strongly typed): "
                "set the top-level `precision: fp16` or `precision: bf16` instead"
            )
        return data

    @model_validator(mode="after")
    def _profile(self) -> TensorRTSettings:
        validate_profile(self.min_shape, self.opt_shape, self.max_shape)
        return self


class ExportConfig(_Section):
    """One export: weights source -> `<output>/<model_name>/` Triton model directory."""

    source: str = Field(description="training artefact dir, weight file, or a timm DINOv2 id (pretrained)")
    arch: Optional[str] = Field(default=None, description="required only for ambiguous weight files")
    output: Path = Path("model_repository")
    model_name: str = DEFAULT_MODEL_NAME
    version: int = Field(default=1, ge=1)
    overwrite: bool = False
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    precision: Precision = "fp32"
    onnx: OnnxSettings = Field(default_factory=OnnxSettings)
    parity: ParitySettings = Field(default_factory=ParitySettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    tensorrt: TensorRTSettings = Field(default_factory=TensorRTSettings)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            arch_spec(value)  # unknown names fail here, before any loading
        return value

    def check_sizes(self, patch_size: int) -> None:
        """Every configured image size against the exported model's patch size (ProfileError)."""
        for size in (self.onnx.example_size, self.quantization.calibration_size, *self.parity.sizes):
            check_size(size, "configured size", patch_size)
        if self.backend == "tensorrt":
            trt = self.tensorrt
            validate_profile(trt.min_shape, trt.opt_shape, trt.max_shape, patch_size)

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or not all(ch.isalnum() or ch in "-_" for ch in value):
            raise ValueError(f"model_name {value!r} may only contain letters, digits, '-' and '_'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        if self.backend == "onnxruntime" and self.precision == "bf16":
            raise ValueError(
                "precision bf16 is for backend tensorrt; onnxruntime has no BF16 kernels for this graph (use fp16)"
            )
        if self.backend == "tensorrt":
            if self.precision == "int8":
                raise ValueError(
                    "backend tensorrt builds strongly typed fp32/fp16/bf16 engines (INT8 would need explicit Q/DQ "
                    "quantisation): set precision fp32, fp16 or bf16 instead of precision int8"
                )
            if self.tensorrt.max_shape[0] < self.triton.max_batch_size:
                raise ProfileError(
                    f"tensorrt max batch {self.tensorrt.max_shape[0]} < triton.max_batch_size "
                    f"{self.triton.max_batch_size}: Triton would send batches the engine cannot run"
                )
        if self.arch is not None:
            self.check_sizes(arch_spec(self.arch).patch_size)
        return self
