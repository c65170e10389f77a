"""The inference callable bound into PyTriton: onnxruntime over the exported `model.onnx`.

PyTriton's bundled tritonserver ships only Triton's python backend, so the ONNX graph cannot
run in Triton's onnxruntime backend as it does in the Docker deployment; instead this callable
receives the dynamic batcher's requests and runs them through onnxruntime in this process.
Requests reach it only through the gateway (`neco.serving.gateway`), which already refused
every shape that breaks the image rules or the `InputLimits`; a direct request to tritonserver's
private loopback port is out of scope (docs/reliability.md). So the runner checks only what
onnxruntime needs to run at all (uint8, [B, H, W, 3], non-empty, sides multiples of 14), not the
limits; a request that fails raises `MalformedRequestError`, which PyTriton turns into an error
response for that batch while the model stays loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.proxy.types import Request

from neco.contract import INPUT_IMAGES, OUTPUTS
from neco.errors import InputError, NecoError
from neco.signature import check_images, choose_providers, signature_problems


class MalformedRequestError(PyTritonBadParameterError, InputError):
    """An inference request whose `images` tensor violates the served contract."""


class ModelLoadError(NecoError, RuntimeError):
    """The ONNX file cannot be served: unreadable, or its tensors differ from the contract."""


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """onnxruntime providers by `neco.signature.choose_providers` (CUDA first when present, else CPU)."""
    try:
        return choose_providers(requested, ort.get_available_providers())
    except InputError as exc:
        raise ModelLoadError(str(exc)) from None


def validate_images(images: Any, patch_size: int) -> np.ndarray:
    """Check that onnxruntime can run one request's `images` for the served model's `patch_size`
    (the core's rules, no limits: see the module)."""
    try:
        return check_images(images, limits=None, patch_size=patch_size)
    except InputError as exc:
        raise MalformedRequestError(str(exc)) from None


class OnnxFeatureRunner:
    """One onnxruntime session over the exported graph, callable by PyTriton with a request list."""

    def __init__(
        self,
        onnx_path: Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        *,
        patch_size: int,
    ):
        """`patch_size` is the served model's (its contract's): requests are checked against it."""
        if not onnx_path.is_file():
            raise ModelLoadError(f"ONNX model {str(onnx_path)!r} does not exist")
        self.patch_size = patch_size
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
        problems = signature_problems(inputs, outputs, vocabulary="ort")
        if problems:
            raise ModelLoadError(f"{onnx_path}: " + "; ".join(problems))

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
        images = [validate_images(request.data.get(INPUT_IMAGES), self.patch_size) for request in requests]
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
