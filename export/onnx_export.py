"""PyTorch -> ONNX: the served graph, with preprocessing and normalisation inside it.

The wrapper takes what a client actually has (UINT8 RGB, channels last) and does the float
conversion and mean/std normalisation in the graph, so no client can normalise differently
from training. Dense features come from `neco.training.backbone.patch_features`, the single
definition shared with training and the torch evaluation backend.

Only the `dynamo=True` exporter is used: it keeps timm's antialiased bicubic position-embedding
interpolation symbolic in H and W (one file serves every multiple-of-14 size), whereas the
TorchScript exporter bakes the example's position embedding or rejects the op.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neco.contract import INPUT_IMAGES, OUTPUTS, PATCH_SIZE, ModelContract
from neco.export.config import OnnxSettings
from neco.export.errors import ExportError
from neco.training.backbone import patch_features

log = logging.getLogger(__name__)

MAX_PROTOBUF_BYTES = 2**31 - 1
"""ONNX files are one protobuf; larger models (ViT-g in FP32) need external weight data."""


class DenseFeatureModel(nn.Module):
    """UINT8 [B, H, W, 3] images -> (L2-normalised features, raw features, CLS token).

    Normalisation constants are buffers scaled by 255 so that `(x - mean) / std` on the raw
    byte values equals the training-time `Normalize(mean, std)` after `ToTensor()`.
    """

    def __init__(self, backbone: nn.Module, contract: ModelContract) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, height, width, _ = images.shape
        rows, cols = height // PATCH_SIZE, width // PATCH_SIZE
        # Channels-last -> channels-first through a patch-grid view: the same single transpose
        # as a plain permute, but the Reshape fails at run time (in onnxruntime, TensorRT and
        # eager) when H or W is not a multiple of 14, instead of silently cropping the border.
        # The Cast comes first because TensorRT only accepts UINT8 tensors at a Cast.
        tiles = images.to(torch.float32).reshape(batch, rows, PATCH_SIZE, cols, PATCH_SIZE, 3)
        pixels = tiles.permute(0, 5, 1, 2, 3, 4).reshape(batch, 3, rows * PATCH_SIZE, cols * PATCH_SIZE)
        grid, cls = patch_features(self.backbone, (pixels - self.mean) / self.std)
        return F.normalize(grid, dim=-1), grid, cls


def export_onnx(model: DenseFeatureModel, path: Path, settings: OnnxSettings) -> Path:
    """Export with dynamic batch/height/width (H, W symbolic multiples of 14) and check it."""
    from torch.export import Dim

    model = model.eval()
    height, width = settings.example_size
    example = torch.randint(0, 256, (settings.example_batch, height, width, 3), dtype=torch.uint8)
    dynamic_shapes = {
        "images": {
            0: Dim("batch", min=1),
            1: PATCH_SIZE * Dim("grid_h", min=1),
            2: PATCH_SIZE * Dim("grid_w", min=1),
        }
    }
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > MAX_PROTOBUF_BYTES * 0.9
    log.info("exporting ONNX (opset %d, example %s, external data %s)", settings.opset, tuple(example.shape), external)
    try:
        # The exporter prints its progress and shape-inference chatter to stdout; our callers
        # report progress themselves, so keep the export quiet.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[INPUT_IMAGES],
                output_names=list(OUTPUTS),
                opset_version=settings.opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export raises many internal types; callers need one
        raise ExportError(f"torch.onnx.export (dynamo) failed: {exc}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external)
    check_onnx(path)
    return path


def check_onnx(path: Path) -> None:
    """Run onnx.checker (full, with shape inference) and confirm the served interface."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejected the graph: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_IMAGES] or outputs != list(OUTPUTS):
        raise ExportError(
            f"{path}: graph I/O {inputs} -> {outputs} differs from the contract {INPUT_IMAGES} -> {OUTPUTS}"
        )


def simplify_onnx(source: Path, destination: Path) -> Path:
    """onnxslim constant folding / fusion; the caller re-checks parity on the result."""
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        slim = onnxslim.slim(str(source))
    if slim is None:
        raise ExportError(f"onnxslim could not simplify {source}")
    onnx.save(slim, str(destination))
    check_onnx(destination)
    return destination


def opset_of(path: Path) -> int:
    """The default-domain opset the graph was written with."""
    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
