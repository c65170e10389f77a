"""The inference callable bound into PyTriton: onnxruntime over the exported `model.onnx`.

PyTriton's bundled tritonserver ships only Triton's python backend, so the ONNX graph cannot
run in Triton's onnxruntime backend as it does in the Docker deployment; instead this callable
receives the dynamic batcher's requests and runs them through onnxruntime in this process.
Requests are validated here because Triton's config check cannot express "H and W are
multiples of 14" or reject an empty batch; a bad request raises `MalformedRequestError`, which
PyTriton turns into an error response for that request batch while the model stays loaded
(only `PyTritonUnrecoverableError` would shut the server down).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.proxy.types import Request

from neco.contract import INPUT_IMAGES, OUTPUTS, PATCH_SIZE
from neco.serving.config import KNOWN_PROVIDERS


class MalformedRequestError(PyTritonBadParameterError, ValueError):
    """An inference request whose `images` tensor violates the served contract."""


class ModelLoadError(RuntimeError):
    """The ONNX file cannot be served: unreadable, or its tensors differ from the contract."""


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """Pick onnxruntime providers: CUDA first when this onnxruntime build has it, else CPU.

    An explicitly requested provider that the installed onnxruntime lacks is an error rather
    than a silent CPU fallback, so a GPU deployment never quietly runs on CPU.
    """
    available = ort.get_available_providers()
    if requested is None:
        return [p for p in KNOWN_PROVIDERS if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise ModelLoadError(f"onnxruntime providers {missing} are not available here (available: {available})")
    return list(requested)


def validate_images(images: Any) -> np.ndarray:
    """Check one request's `images` tensor against the contract; return it unchanged."""
    if not isinstance(images, np.ndarray):
        raise MalformedRequestError(f"{INPUT_IMAGES}: expected a tensor, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise MalformedRequestError(f"{INPUT_IMAGES}: dtype must be UINT8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise MalformedRequestError(
            f"{INPUT_IMAGES}: shape must be [batch, height, width, 3] (RGB), got {list(images.shape)}"
        )
    batch, height, width, _ = images.shape
    if batch == 0:
        raise MalformedRequestError(f"{INPUT_IMAGES}: empty batch (batch dimension is 0)")
    if height == 0 or width == 0 or height % PATCH_SIZE or width % PATCH_SIZE:
        raise MalformedRequestError(
            f"{INPUT_IMAGES}: height {height} and width {width} must be positive multiples of the "
            f"patch size {PATCH_SIZE} (resize or pad on the client)"
        )
    return images


class OnnxFeatureRunner:
    """One onnxruntime session over the exported graph, callable by PyTriton with a request list."""

    def __init__(self, onnx_path: Path, providers: Sequence[str] | None = None, intra_op_threads: int = 0):
        if not onnx_path.is_file():
            raise ModelLoadError(f"ONNX model {str(onnx_path)!r} does not exist")
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.providers = resolve_providers(providers)
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"onnxruntime cannot load {str(onnx_path)!r}: {exc}") from exc
        self._check_signature(onnx_path)

    def _check_signature(self, onnx_path: Path) -> None:
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name: o.type for o in self.session.get_outputs()}
        if inputs != {INPUT_IMAGES: "tensor(uint8)"}:
            raise ModelLoadError(f"{onnx_path}: inputs {inputs} differ from the contract ({INPUT_IMAGES}: uint8)")
        missing = [name for name in OUTPUTS if outputs.get(name) != "tensor(float)"]
        if missing:
            raise ModelLoadError(f"{onnx_path}: float32 outputs {missing} missing (graph outputs: {outputs})")

    def run(self, images: np.ndarray, outputs: Sequence[str] = OUTPUTS) -> dict[str, np.ndarray]:
        """The named outputs for one validated [B, H, W, 3] uint8 batch."""
        values = self.session.run(list(outputs), {INPUT_IMAGES: images})
        return dict(zip(outputs, values))

    def __call__(self, requests: Sequence[Request]) -> list[dict[str, np.ndarray]]:
        """Serve one dynamic-batcher batch: validate all, run each image size once, split back.

        Triton only batches requests whose non-batch dimensions agree, so normally there is a
        single group; grouping by size keeps this correct should that ever change. Only the
        outputs some request asked for are computed and handed back, which saves copying
        unused patch grids through PyTriton's shared memory.
        """
        images = [validate_images(request.data.get(INPUT_IMAGES)) for request in requests]
        wanted = [[n for n in OUTPUTS if n in (r.requested_output_names or OUTPUTS)] for r in requests]
        responses: dict[int, dict[str, np.ndarray]] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for index, batch in enumerate(images):
            groups.setdefault(batch.shape[1:3], []).append(index)
        for indices in groups.values():
            stacked = images[indices[0]] if len(indices) == 1 else np.concatenate([images[i] for i in indices])
            names = [n for n in OUTPUTS if any(n in wanted[i] for i in indices)]
            outputs = self.run(stacked, names)
            start = 0
            for i in indices:
                stop = start + images[i].shape[0]
                responses[i] = {name: outputs[name][start:stop] for name in wanted[i]}
                start = stop
        return [responses[i] for i in range(len(images))]
