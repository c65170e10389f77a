"""PyTorch -> ONNX: the served graph, with preprocessing and normalisation inside it.

The exported module is `neco.model.DenseFeatureModel`: it takes what a client actually has
(UINT8 RGB, channels last) and does the float conversion and mean/std normalisation in the
graph, so no client can normalise differently from training; its dense features are the
single definition shared with training and the torch evaluation backend.

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

from neco.export.config import OnnxSettings
from neco.export.errors import ExportError
from neco.model import DenseFeatureModel
from neco.model.rope import export_safe_rope
from neco.signature import INPUT, OUTPUT_SPECS, check_images

log = logging.getLogger(__name__)

MAX_PROTOBUF_BYTES = 2**31 - 1
"""ONNX files are one protobuf; larger models (ViT-g in FP32) need external weight data."""


def export_onnx(model: DenseFeatureModel, path: Path, settings: OnnxSettings) -> Path:
    """Export with dynamic batch/height/width (H, W symbolic multiples of the model's patch) and check it.

    DINOv2's learned position embeddings are interpolated per grid, DINOv3's RoPE is recomputed
    per grid; both trace into shape arithmetic on the symbolic grid, with no data-dependent
    control flow (no If/Loop; see `control_flow_ops`), so TensorRT can parse the graph.
    """
    from torch.export import Dim

    model = model.eval()
    height, width = settings.example_size
    example_array = torch.randint(0, 256, (settings.example_batch, height, width, 3), dtype=torch.uint8).numpy()
    example = torch.from_numpy(check_images(example_array, limits=None, patch_size=model.patch_size))
    dynamic_shapes = {
        INPUT.name: {
            0: Dim("batch", min=1),
            1: model.patch_size * Dim("grid_h", min=1),
            2: model.patch_size * Dim("grid_w", min=1),
        }
    }
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > MAX_PROTOBUF_BYTES * 0.9
    log.info("exporting ONNX (opset %d, example %s, external data %s)", settings.opset, tuple(example.shape), external)
    try:
        # The exporter prints its progress and shape-inference chatter to stdout; our callers
        # report progress themselves, so keep the export quiet.
        with torch.no_grad(), export_safe_rope(model), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[INPUT.name],
                output_names=[spec.name for spec in OUTPUT_SPECS],
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
    expected = [spec.name for spec in OUTPUT_SPECS]
    if inputs != [INPUT.name] or outputs != expected:
        raise ExportError(
            f"{path}: graph I/O {inputs} -> {outputs} differs from the contract {INPUT.name} -> {expected}"
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
