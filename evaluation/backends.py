"""Interchangeable feature backends behind the client's `FeatureBackend` protocol.

Evaluation must measure exactly what applications get, so Hummingbird, the demo and
`neco.client.segment` all consume a `FeatureBackend`; only where the features come from
changes: the served model (`neco.client.NecoClient` over Triton), an exported ONNX file run
in-process (`OnnxBackend`), or a checkpoint / timm model run in PyTorch (`TorchBackend`).
The ONNX and Torch backends reproduce the served graph's contract: uint8 RGB in, ImageNet
normalisation inside, L2-normalised final-norm patch tokens out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from neco.contract import DEFAULT_MODEL_NAME, INPUT_IMAGES, OUTPUT_FEATURES, PATCH_SIZE, ModelContract

if TYPE_CHECKING:
    from neco.client.backend import FeatureBackend
    from neco.client.images import SizeSpec

BackendKind = Literal["triton", "onnx", "torch"]


class BackendError(ValueError):
    """A backend cannot be built from the given arguments, or was fed unusable images."""


def stack_images(images: Sequence[np.ndarray]) -> np.ndarray:
    """Validate the FeatureBackend input contract and stack to uint8 [B, H, W, 3]."""
    if len(images) == 0:
        raise BackendError("features() needs at least one image")
    first = np.asarray(images[0])
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BackendError(f"image {i}: expected HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
        if image.shape != first.shape:
            raise BackendError(f"image {i} is {image.shape} but image 0 is {first.shape}; a batch must share one size")
    h, w = first.shape[:2]
    if h % PATCH_SIZE or w % PATCH_SIZE or h == 0 or w == 0:
        raise BackendError(f"image size {h}x{w} is not a positive multiple of the patch size {PATCH_SIZE}")
    return np.ascontiguousarray(np.stack([np.asarray(i) for i in images]))


def _find_onnx(model: Path) -> tuple[Path, Path | None]:
    """Resolve a model.onnx file or a Triton model dir (`<dir>/config.pbtxt`, `<dir>/<v>/model.onnx`)."""
    if model.is_file():
        model_dir = model.parent.parent if (model.parent.parent / "config.pbtxt").is_file() else None
        return model, model_dir
    if model.is_dir():
        versions = sorted((p for p in model.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        for version in reversed(versions):
            if (version / "model.onnx").is_file():
                return version / "model.onnx", model if (model / "config.pbtxt").is_file() else None
        raise BackendError(f"no <version>/model.onnx under model directory {model}")
    raise BackendError(f"ONNX model {model} does not exist")


class OnnxBackend:
    """onnxruntime on an exported `model.onnx` (the same graph Triton serves).

    The contract comes from the Triton `config.pbtxt` next to the file when there is one
    (so a repository is self-describing), else from `contract`/`arch` given by the caller.
    """

    def __init__(
        self,
        model: str | Path,
        contract: ModelContract | None = None,
        arch: str | None = None,
        providers: Sequence[str] | None = None,
        batch_size: int = 8,
    ) -> None:
        import onnxruntime as ort

        path, model_dir = _find_onnx(Path(model))
        if contract is None and model_dir is not None:
            from neco.export.repository import contract_from_config, read_model_config

            contract = contract_from_config(read_model_config(model_dir))
        if contract is None and arch is not None:
            contract = ModelContract.for_arch(arch)
        if contract is None:
            raise BackendError(f"{path} has no config.pbtxt beside it; pass the contract or --arch")
        self.contract = contract
        self.batch_size = batch_size
        available = ort.get_available_providers()
        chosen = (
            list(providers)
            if providers
            else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        )
        self._session = ort.InferenceSession(str(path), providers=chosen)
        names = {o.name for o in self._session.get_outputs()}
        if OUTPUT_FEATURES not in names or INPUT_IMAGES not in {i.name for i in self._session.get_inputs()}:
            raise BackendError(f"{path} lacks input {INPUT_IMAGES!r} or output {OUTPUT_FEATURES!r}; not a NeCo export")

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = stack_images(images)
        parts = [
            self._session.run([OUTPUT_FEATURES], {INPUT_IMAGES: batch[i : i + self.batch_size]})[0]
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available; asking for cuda without it is an error, not a fallback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but CUDA is not available")
    return device


class TorchBackend:
    """`neco.training.backbone.patch_features` in-process; bf16 autocast on CUDA.

    Accepts anything `load_backbone` does (training artefact, timm name, DINOv2 .pth, NeCo
    .ckpt) or an already-built model + contract, which is how training evaluates itself.
    """

    def __init__(
        self,
        source: str | Path | None = None,
        arch: str | None = None,
        device: str = "auto",
        batch_size: int = 8,
        model: object | None = None,
        contract: ModelContract | None = None,
    ) -> None:
        import torch

        from neco.training.backbone import load_backbone

        if model is None:
            if source is None:
                raise BackendError("TorchBackend needs a checkpoint/artefact source or a model")
            model, contract = load_backbone(source, arch)
        elif contract is None:
            raise BackendError("TorchBackend(model=...) also needs its contract")
        self.device = resolve_device(device)
        self.contract = contract
        self.batch_size = batch_size
        self.model = model.to(self.device).eval()  # type: ignore[attr-defined]
        self._mean = torch.tensor(contract.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(contract.std, device=self.device).view(1, 3, 1, 1)

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from neco.training.backbone import patch_features

        batch = stack_images(images)
        out = []
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")),
        ):
            for i in range(0, len(batch), self.batch_size):
                x = torch.from_numpy(batch[i : i + self.batch_size]).to(self.device)
                x = (x.permute(0, 3, 1, 2).float() / 255.0 - self._mean) / self._std
                tokens, _ = patch_features(self.model, x)
                out.append(F.normalize(tokens.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


def make_backend(
    kind: BackendKind,
    *,
    model: str | Path | None = None,
    url: str = "localhost:8001",
    protocol: str = "grpc",
    model_name: str = DEFAULT_MODEL_NAME,
    arch: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
) -> FeatureBackend:
    """Build the backend chosen by `--backend`.

    triton: `url`/`protocol`/`model_name` of a running server; onnx: `model` is a model.onnx
    or Triton model dir; torch: `model` is anything `load_backbone` accepts (or `arch` alone
    for a timm model with cached pretrained weights).
    """
    if kind == "triton":
        from neco.client import NecoClient

        return NecoClient(url=url, protocol=protocol, model=model_name, batch_size=batch_size)  # type: ignore[arg-type]
    if kind == "onnx":
        if model is None:
            raise BackendError("--backend onnx needs --model PATH (model.onnx or a Triton model directory)")
        return OnnxBackend(model, arch=arch, batch_size=batch_size)
    if kind == "torch":
        source = model if model is not None else arch
        if source is None:
            raise BackendError("--backend torch needs --model (artefact/checkpoint) or --arch")
        return TorchBackend(source, arch=arch, device=device, batch_size=batch_size)
    raise BackendError(f"unknown backend {kind!r}; use triton, onnx or torch")


class BackendConfig(BaseModel):
    """The `--backend` flag group as a config section shared by every evaluation command."""

    model_config = ConfigDict(extra="forbid")

    kind: BackendKind = "torch"
    model: Path | None = Field(None, description="onnx: model.onnx or model dir; torch: artefact/checkpoint")
    url: str = "localhost:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    model_name: str = DEFAULT_MODEL_NAME
    arch: str | None = None
    device: str = "auto"
    batch_size: int = Field(8, ge=1)

    def build(self) -> FeatureBackend:
        return make_backend(
            self.kind,
            model=self.model,
            url=self.url,
            protocol=self.protocol,
            model_name=self.model_name,
            arch=self.arch,
            device=self.device,
            batch_size=self.batch_size,
        )


def iter_features(
    backend: FeatureBackend,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    size: SizeSpec,
    *,
    batch_size: int = 8,
    desc: str = "features",
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ((h, w, C) features, full-size mask) per pair, batching same-size inputs.

    Images are resized by the client's one policy (`prepare_image`); consecutive images that
    end up the same size share one backend call, which is what makes evaluation on a server
    or GPU efficient. Masks are passed through untouched (scored at their own size).
    """
    from tqdm import tqdm

    from neco.client.backend import batch_features
    from neco.client.images import prepare_image

    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for image, mask in tqdm(pairs, total=len(pairs), desc=desc, unit="img", disable=not progress):
        prepared = prepare_image(image, size, backend.contract.patch_size)
        if pending and (len(pending) >= batch_size or pending[0][0].shape != prepared.array.shape):
            yield from zip(batch_features(backend, [array for array, _ in pending]), (m for _, m in pending))
            pending.clear()
        pending.append((prepared.array, mask))
    if pending:
        yield from zip(batch_features(backend, [array for array, _ in pending]), (m for _, m in pending))
