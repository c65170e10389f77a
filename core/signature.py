"""The served signature, executed: tensor specs, the input rules and their one validation.

`neco.contract` names the served tensors; this module is what every stage runs to check
them, so the rules exist exactly once:

* export builds its example inputs and checks the ONNX graph's I/O with it,
* serving validates every request with `check_images` (and the session with
  `check_session_signature`) before running the model,
* the client validates each batch before sending it,
* every evaluation backend validates its input batches.

Input limits (`InputLimits`) bound the largest side and the pixels per image and per
request; they are configurable where a stage takes a config, with defaults that keep a ViT-S
forward pass well inside a 24 GB machine. Torch-free and onnxruntime-free (numpy only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from neco.contract import INPUT_IMAGES, OUTPUT_CLS, OUTPUT_FEATURES, OUTPUT_FEATURES_RAW, registered_patch_sizes
from neco.errors import InputError

# Names of the served element types in the three vocabularies the stages meet.
_TRITON_DTYPES = {"uint8": "UINT8", "float32": "FP32"}
_ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}
TRITON_DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}  # fmt: skip
"""Bytes per element of Triton's fixed-size data types (BYTES has none): a request's declared size."""


@dataclass(frozen=True)
class TensorSpec:
    """One served tensor: name, numpy element type and per-item dims (batch excluded, -1 = any)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    """Symbolic: "H", "W" are image sides, "h", "w" patch-grid sides, "C" the feature width."""

    @property
    def triton_dtype(self) -> str:
        """Triton's data-type name ("UINT8", "FP32"), as in config.pbtxt (`TYPE_` prefix off)."""
        return _TRITON_DTYPES[self.dtype]

    @property
    def ort_type(self) -> str:
        """onnxruntime's type string of the tensor ("tensor(uint8)", "tensor(float)")."""
        return _ORT_TYPES[self.dtype]

    def triton_dims(self, embed_dim: int) -> list[int]:
        """Dims for a Triton model config: every symbolic side is -1, "C" is the width."""
        return [embed_dim if d == "C" else (-1 if isinstance(d, str) else d) for d in self.dims]


INPUT = TensorSpec(INPUT_IMAGES, "uint8", ("H", "W", 3))
"""RGB images, channels last; H and W positive multiples of the served model's patch size."""
OUTPUT_SPECS: tuple[TensorSpec, ...] = (
    TensorSpec(OUTPUT_FEATURES, "float32", ("h", "w", "C")),
    TensorSpec(OUTPUT_FEATURES_RAW, "float32", ("h", "w", "C")),
    TensorSpec(OUTPUT_CLS, "float32", ("C",)),
)
SPECS: dict[str, TensorSpec] = {spec.name: spec for spec in (INPUT, *OUTPUT_SPECS)}


class InputLimits(BaseModel):
    """Size limits of one request, enforced before anything is decoded or allocated.

    Attention cost grows with the square of the patch count, so the limits bound pixels,
    not only bytes: at the defaults a request holds at most 8 MP (about 43k ViT patches).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_side: int = Field(4096, ge=1, description="largest height or width in pixels")
    max_image_pixels: int = Field(1024 * 1024, ge=1, description="H x W of one image")
    max_request_pixels: int = Field(8 * 1024 * 1024, ge=1, description="B x H x W of a batch")
    max_batch: int = Field(64, ge=1, description="images in one request")


DEFAULT_LIMITS = InputLimits()


class ImageShapeError(InputError):
    """An `images` batch has the wrong dtype, rank, channels or a side that breaks the rules."""


class InputLimitError(InputError):
    """An `images` batch is larger than the configured `InputLimits`."""


def check_image_shape(
    shape: Sequence[int], limits: InputLimits | None = DEFAULT_LIMITS, *, patch_size: int | None = None
) -> tuple[int, int, int]:
    """Check a declared [B, H, W, 3] shape against the rules and limits; return (B, H, W).

    Works on the shape alone, so a server can refuse a request from its header before it
    allocates or decodes the data. `patch_size` is the served model's; a caller that does
    not know the model (None) refuses only sides that suit no registered patch size
    (`registered_patch_sizes`), and the model's holder checks the exact multiple.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ImageShapeError(f"{INPUT_IMAGES}: shape must be [batch, height, width, 3] (RGB), got {list(shape)}")
    batch, height, width, _ = shape
    if batch <= 0:
        raise ImageShapeError(f"{INPUT_IMAGES}: empty batch (batch dimension is {batch})")
    patches = (patch_size,) if patch_size else registered_patch_sizes()
    if height <= 0 or width <= 0 or all(height % p or width % p for p in patches):
        raise ImageShapeError(
            f"{INPUT_IMAGES}: height {height} and width {width} must each be a positive multiple of the "
            f"patch size {' or '.join(map(str, patches))} (resize or pad on the client)"
        )
    if limits is not None:
        if max(height, width) > limits.max_side:
            raise InputLimitError(f"{INPUT_IMAGES}: side {max(height, width)} px exceeds max_side={limits.max_side}")
        if height * width > limits.max_image_pixels:
            raise InputLimitError(
                f"{INPUT_IMAGES}: {height}x{width} = {height * width} px exceeds "
                f"max_image_pixels={limits.max_image_pixels}"
            )
        if batch > limits.max_batch:
            raise InputLimitError(f"{INPUT_IMAGES}: batch {batch} exceeds max_batch={limits.max_batch}")
        if batch * height * width > limits.max_request_pixels:
            raise InputLimitError(
                f"{INPUT_IMAGES}: {batch} x {height}x{width} = {batch * height * width} px exceeds "
                f"max_request_pixels={limits.max_request_pixels}"
            )
    return batch, height, width


def check_images(images: object, limits: InputLimits | None = DEFAULT_LIMITS, *, patch_size: int) -> np.ndarray:
    """Validate one `images` batch (uint8 [B, H, W, 3]) for a model of `patch_size`; return it contiguous."""
    if not isinstance(images, np.ndarray):
        raise ImageShapeError(f"{INPUT_IMAGES}: expected a tensor (numpy array), got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ImageShapeError(
            f"{INPUT_IMAGES}: dtype must be {INPUT.triton_dtype} (numpy {INPUT.dtype}), got {images.dtype}"
        )
    check_image_shape(images.shape, limits, patch_size=patch_size)
    return np.ascontiguousarray(images)


def stack_images(
    images: Sequence[np.ndarray], limits: InputLimits | None = DEFAULT_LIMITS, *, patch_size: int
) -> np.ndarray:
    """Stack equal-size H x W x 3 uint8 images into one checked batch (what backends receive)."""
    if len(images) == 0:
        raise ImageShapeError(f"{INPUT_IMAGES}: at least one image is needed")
    first = np.asarray(images[0])
    for index, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageShapeError(f"image {index}: expected HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
        if image.shape != first.shape:
            raise ImageShapeError(f"image {index} is {image.shape} but image 0 is {first.shape}; one batch, one size")
    return check_images(np.stack([np.asarray(i) for i in images]), limits, patch_size=patch_size)


def output_shape(name: str, batch: int, height: int, width: int, embed_dim: int, patch_size: int) -> tuple[int, ...]:
    """The shape a model of `patch_size` must return for `name` given an input of [batch, height, width, 3]."""
    grid = (height // patch_size, width // patch_size)
    return (batch, embed_dim) if SPECS[name].dims == ("C",) else (batch, *grid, embed_dim)


def signature_problems(inputs: Mapping[str, str], outputs: Mapping[str, str], vocabulary: str = "ort") -> list[str]:
    """What is wrong with a model's I/O {name: type}, as human-readable lines (empty: all good).

    `vocabulary` says how the types are written: "ort" ("tensor(uint8)") for onnxruntime
    sessions, "triton" ("UINT8") for model configs.
    """
    spell = (lambda s: s.ort_type) if vocabulary == "ort" else (lambda s: s.triton_dtype)
    problems = []
    if dict(inputs) != {INPUT.name: spell(INPUT)}:
        problems.append(f"inputs {dict(inputs)} differ from the contract ({INPUT.name}: {spell(INPUT)})")
    for spec in OUTPUT_SPECS:
        if outputs.get(spec.name) != spell(spec):
            problems.append(f"output {spec.name!r} must be {spell(spec)}, got {outputs.get(spec.name)}")
    extra = sorted(set(outputs) - {spec.name for spec in OUTPUT_SPECS})
    if extra:
        problems.append(f"outputs {extra} are not part of the served contract")
    return problems


CPU_PROVIDER = "CPUExecutionProvider"
KNOWN_PROVIDERS: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER)
"""onnxruntime execution providers the project knows, in order of preference."""


def choose_providers(
    requested: Sequence[str] | None, available: Sequence[str], preferred: Sequence[str] = ("CUDAExecutionProvider",)
) -> list[str]:
    """The onnxruntime providers to use: `requested` exactly, or `preferred` ones found + CPU.

    A requested provider the installed onnxruntime lacks is an error rather than a silent CPU
    fallback, so a GPU deployment never quietly runs on CPU.
    """
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise InputError(f"onnxruntime providers {missing} are not available here (available: {list(available)})")
        return list(requested)
    return [p for p in (*preferred, CPU_PROVIDER) if p in available]
