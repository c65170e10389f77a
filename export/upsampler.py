"""A learned feature upsampler as a second model in the Triton repository, and its local runner.

Learned upsamplers (AnyUp, JAFAR, LoftUp, FeatSharp) take the encoder's low-resolution patch
features and the image and return pixel-resolution features. This module fixes one served
interface for any of them, so a user can export theirs next to the encoder and the client can
call it like the training-free `neco.client.upsample` (both satisfy the client's
`FeatureUpsampler` protocol):

    inputs   features     FP32   [B, h, w, C]  the encoder's `features` output, as served
             images       UINT8  [B, H, W, 3]  RGB, the image the mask / features are wanted for
    output   features_hr  FP32   [B, H, W, C]

`ServedUpsampler` adapts a module written the usual research way, `forward(features NCHW,
image NCHW normalised) -> NCHW`, to that interface: channels-last in and out, uint8 -> float
and mean/std normalisation (the encoder contract's) inside the graph, as the encoder's export
does. `export_upsampler` exports it with dynamic batch, grid and image sizes (dynamo exporter)
and writes `<repository>/<name>/{config.pbtxt, 1/model.onnx}` with the encoder's contract in
the config's parameters, so a client can check the pair belongs together. `OnnxUpsampler` runs
such a file (or model directory) in onnxruntime. docs/client.md shows an export end to end.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

from neco.contract import INPUT_IMAGES, OUTPUT_FEATURES, ModelContract
from neco.export.errors import ExportError
from neco.export.repository import write_model_directory
from neco.triton_config import CONFIG_FILENAME, ONNX_FILENAME

FEATURES_IN, IMAGES_IN = OUTPUT_FEATURES, INPUT_IMAGES  # the encoder's own tensor names: its output goes straight in
FEATURES_OUT = "features_hr"
ROLE_PARAMETER, ROLE = "neco_role", "feature_upsampler"
"""Config parameter marking the model as an upsampler (the encoder's config has no such key)."""


class ServedUpsampler(nn.Module):
    """Wraps `forward(features NCHW, image NCHW normalised) -> NCHW` into the served interface."""

    def __init__(self, upsampler: nn.Module, contract: ModelContract) -> None:
        super().__init__()
        self.upsampler = upsampler
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        image = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        upsampled = self.upsampler(features.permute(0, 3, 1, 2), image)
        return upsampled.permute(0, 2, 3, 1).contiguous()


def upsampler_config(name: str, contract: ModelContract, max_batch_size: int = 4) -> mc.ModelConfig:
    """The Triton config of a served upsampler: onnxruntime, dynamic sizes, the encoder's contract."""
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size, backend="onnxruntime")
    cfg.default_model_filename = ONNX_FILENAME
    width = contract.embed_dim
    cfg.input.add(name=FEATURES_IN, data_type=mc.TYPE_FP32, dims=[-1, -1, width])
    cfg.input.add(name=IMAGES_IN, data_type=mc.TYPE_UINT8, dims=[-1, -1, 3])
    cfg.output.add(name=FEATURES_OUT, data_type=mc.TYPE_FP32, dims=[-1, -1, width])
    cfg.dynamic_batching.SetInParent()  # same-size requests share a run; sizes differ, so no preferred batch
    for key, value in sorted({**contract.to_parameters(), ROLE_PARAMETER: ROLE}.items()):
        cfg.parameters[key].string_value = value
    return cfg


def export_upsampler(
    upsampler: nn.Module,
    contract: ModelContract,
    repository: str | Path,
    name: str,
    *,
    example_grid: tuple[int, int] = (8, 8),
    example_image: tuple[int, int] = (112, 112),
    opset: int = 18,
    overwrite: bool = False,
) -> Path:
    """Export `upsampler` (NCHW research interface) as `<repository>/<name>`; returns the model directory."""
    from torch.export import Dim

    served = ServedUpsampler(upsampler, contract).eval()
    features = torch.randn(1, *example_grid, contract.embed_dim)
    images = torch.randint(0, 256, (1, *example_image, 3), dtype=torch.uint8)
    batch = Dim("batch", min=1)
    dynamic = {
        FEATURES_IN: {0: batch, 1: Dim("grid_h", min=2), 2: Dim("grid_w", min=2)},
        IMAGES_IN: {0: batch, 1: Dim("height", min=2), 2: Dim("width", min=2)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ONNX_FILENAME
        try:
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    served,
                    (features, images),
                    dynamo=True,
                    dynamic_shapes=dynamic,
                    input_names=[FEATURES_IN, IMAGES_IN],
                    output_names=[FEATURES_OUT],
                    opset_version=opset,
                    verbose=False,
                )
        except Exception as exc:  # torch.export raises many internal types; callers need one
            raise ExportError(f"exporting the upsampler failed: {exc}") from exc
        if program is None:
            raise ExportError("torch.onnx.export returned no program for the upsampler")
        program.save(str(path))
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the upsampler graph: {exc}") from exc
        return write_model_directory(
            repository, upsampler_config(name, contract), {ONNX_FILENAME: path}, overwrite=overwrite
        )


class OnnxUpsampler:
    """An exported upsampler in onnxruntime: `(features (h, w, C), image (H, W, 3) uint8) -> (H, W, C)`.

    Satisfies `neco.client.upsample.FeatureUpsampler`, so it plugs into
    `neco.client.upsample.upsample_features(..., method=OnnxUpsampler(path))`.
    """

    def __init__(self, model: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(model)
        if path.is_dir():
            versions = sorted((p for p in path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
            if not versions or not (versions[-1] / ONNX_FILENAME).is_file() or not (path / CONFIG_FILENAME).is_file():
                raise ExportError(f"{path} is not an upsampler model directory (config.pbtxt + <version>/model.onnx)")
            path = versions[-1] / ONNX_FILENAME
        self._session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        names = ({i.name for i in self._session.get_inputs()}, {o.name for o in self._session.get_outputs()})
        if names != ({FEATURES_IN, IMAGES_IN}, {FEATURES_OUT}):
            raise ExportError(f"{path} does not have the upsampler interface: inputs/outputs {names}")

    def __call__(self, features: np.ndarray, image: np.ndarray) -> np.ndarray:
        feed = {
            FEATURES_IN: np.ascontiguousarray(features, dtype=np.float32)[None],
            IMAGES_IN: np.ascontiguousarray(image, dtype=np.uint8)[None],
        }
        return self._session.run([FEATURES_OUT], feed)[0][0]
