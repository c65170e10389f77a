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

from neco import signature
from neco.contract import DEFAULT_MODEL_NAME, OUTPUT_FEATURES, ModelContract
from neco.errors import InputError, NecoError
from neco.triton_config import CONFIG_FILENAME, ONNX_FILENAME

if TYPE_CHECKING:
    from neco.client import FeatureBackend
    from neco.client.images import SizeSpec

BackendKind = Literal["triton", "onnx", "torch"]


class BackendError(NecoError, ValueError):
    """A backend cannot be built from the given arguments, or was fed unusable images."""


def stack_images(images: Sequence[np.ndarray], patch_size: int) -> np.ndarray:
    """The core's batch check (`neco.signature.stack_images`) for a model of `patch_size`,
    failing with `BackendError`."""
    try:
        return signature.stack_images(images, limits=None, patch_size=patch_size)
    except InputError as exc:
        raise BackendError(str(exc)) from None


def _find_onnx(model: Path) -> tuple[Path, Path | None]:
    """Resolve a model.onnx file or a Triton model dir (`<dir>/config.pbtxt`, `<dir>/<v>/model.onnx`)."""
    if model.is_file():
        model_dir = model.parent.parent if (model.parent.parent / CONFIG_FILENAME).is_file() else None
        return model, model_dir
    if model.is_dir():
        versions = sorted((p for p in model.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        for version in reversed(versions):
            if (version / ONNX_FILENAME).is_file():
                return version / ONNX_FILENAME, model if (model / CONFIG_FILENAME).is_file() else None
        raise BackendError(f"no <version>/{ONNX_FILENAME} under model directory {model}")
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

        from neco.triton_config import contract_from_config, read_model_config

        path, model_dir = _find_onnx(Path(model))
        if contract is None and model_dir is not None:
            contract = contract_from_config(read_model_config(model_dir))
        if contract is None and arch is not None:
            contract = ModelContract.for_arch(arch)
        if contract is None:
            raise BackendError(f"{path} has no {CONFIG_FILENAME} beside it; pass the contract or --arch")
        self.contract = contract
        self.batch_size = batch_size
        try:
            chosen = signature.choose_providers(providers, ort.get_available_providers())
        except InputError as exc:
            raise BackendError(str(exc)) from None
        self._session = ort.InferenceSession(str(path), providers=chosen)
        problems = signature.signature_problems(
            {i.name: i.type for i in self._session.get_inputs()}, {o.name: o.type for o in self._session.get_outputs()}
        )
        if problems:
            raise BackendError(f"{path} is not a NeCo export: " + "; ".join(problems))

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = stack_images(images, self.contract.patch_size)
        parts = [
            self._session.run([OUTPUT_FEATURES], {signature.INPUT.name: batch[i : i + self.batch_size]})[0]
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)


class TorchBackend:
    """`neco.model.DenseFeatureModel` in-process (the module the ONNX graph is exported from).

    Accepts anything `load_backbone` does (training artefact, timm name, DINOv2 .pth, NeCo
    .ckpt) or an already-built model + contract; bf16 autocast on CUDA.
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
        from neco.model import DenseFeatureModel, load_backbone, resolve_device

        if model is None:
            if source is None:
                raise BackendError("TorchBackend needs a checkpoint/artefact source or a model")
            model, contract = load_backbone(source, arch)
        elif contract is None:
            raise BackendError("TorchBackend(model=...) also needs its contract")
        try:
            self.device = str(resolve_device(device))
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        self.contract = contract
        self.batch_size = batch_size
        self.model = model.to(self.device).eval()  # type: ignore[attr-defined]
        self._dense = DenseFeatureModel(self.model, contract).to(self.device).eval()

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        batch = stack_images(images, self.contract.patch_size)
        out = []
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")),
        ):
            for i in range(0, len(batch), self.batch_size):
                _, raw, _ = self._dense(torch.from_numpy(batch[i : i + self.batch_size]).to(self.device))
                out.append(F.normalize(raw.float(), dim=-1).cpu().numpy())
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
            raise BackendError("--backend onnx needs --source PATH (model.onnx or a Triton model directory)")
        return OnnxBackend(model, arch=arch, batch_size=batch_size)
    if kind == "torch":
        source = model if model is not None else arch
        if source is None:
            raise BackendError("--backend torch needs --source (artefact/checkpoint) or --arch")
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
    desc: str = "extract",
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ((h, w, C) features, full-size mask) per pair, batching same-size inputs.

    Images are resized by the client's one policy (`prepare_image`); consecutive images that
    end up the same size share one backend call, which is what makes evaluation on a server
    or GPU efficient. Masks are passed through untouched (scored at their own size).
    """
    from tqdm import tqdm

    from neco.client import batch_features, prepare_image

    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for image, mask in tqdm(pairs, total=len(pairs), desc=desc, unit="img", disable=not progress):
        prepared = prepare_image(image, size, backend.contract.patch_size)
        if pending and (len(pending) >= batch_size or pending[0][0].shape != prepared.array.shape):
            yield from zip(batch_features(backend, [array for array, _ in pending]), (m for _, m in pending))
            pending.clear()
        pending.append((prepared.array, mask))
    if pending:
        yield from zip(batch_features(backend, [array for array, _ in pending]), (m for _, m in pending))
