"""The one batch contract between feature producers and the bank/segmentation code.

`NecoClient` (Triton), and the evaluation stage's ONNX and torch backends, all implement
`FeatureBackend`, so `MemoryBank.build` and `segment` never care where features come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from neco.client.errors import ContractError
from neco.client.images import ImageLike, PreparedImage, SizeSpec, prepare_image
from neco.contract import ModelContract
from neco.signature import DEFAULT_LIMITS, InputLimits


@runtime_checkable
class FeatureBackend(Protocol):
    """Turns a batch of prepared images into L2-normalised dense patch features.

    `batch` is uint8 [B, H, W, 3] RGB with H and W multiples of the contract's patch size (see
    `neco.client.images.prepare_image`); the result is [B, H/p, W/p, C] float32 with unit-norm
    patch vectors. A backend with request limits has a `limits` attribute (`NecoClient` does).
    """

    contract: ModelContract

    def features(self, batch: np.ndarray) -> np.ndarray: ...


def prepare_for(backend: FeatureBackend, image: ImageLike, size: SizeSpec) -> PreparedImage:
    """Decode and resize `image` by the policy with `backend`'s patch size, within its limits (the
    defaults for a backend without any), so no image is prepared that the backend would refuse."""
    limits: InputLimits | None = getattr(backend, "limits", DEFAULT_LIMITS)
    return prepare_image(image, size, backend.contract.patch_size, limits=limits)


def batch_features(backend: FeatureBackend, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """[B, h, w, C] features of equal-size prepared images (a [B, H, W, 3] array or a list).

    A backend that returns the wrong grid or width would silently poison a memory bank, so the
    shape is validated here, once, for every backend.
    """
    if len(images) == 0:
        raise ValueError("batch_features needs at least one image")
    batch = images if isinstance(images, np.ndarray) else np.stack(images)
    feats = np.asarray(backend.features(batch), dtype=np.float32)
    count, height, width = batch.shape[:3]
    patch = backend.contract.patch_size
    expected = (count, height // patch, width // patch, backend.contract.embed_dim)
    if feats.shape != expected:
        raise ContractError(
            f"backend returned features of shape {feats.shape} for {count} image(s) of "
            f"{height}x{width}; the contract ({backend.contract.arch}, patch {patch}) implies {expected}"
        )
    return feats
