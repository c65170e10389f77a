"""The one interface between feature producers and the bank/segmentation code.

`NecoClient` (Triton), and the evaluation stage's ONNX and torch backends, all implement
`FeatureBackend`, so `MemoryBank.build` and `segment` never care where features come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from neco.contract import ModelContract

from .errors import ContractError


@runtime_checkable
class FeatureBackend(Protocol):
    """Produces L2-normalised dense patch features for batches of prepared images.

    `images` are equal-size HxWx3 uint8 RGB arrays with H and W multiples of the contract's
    patch size (see `neco.client.images.prepare_image`); the result is (B, H/p, W/p, C)
    float32 with unit-norm patch vectors. `NecoClient.features` returns a list of array-like
    `DenseFeatures` instead of one stacked array; `batch_features` accepts both.
    """

    contract: ModelContract

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


def batch_features(backend: FeatureBackend, images: Sequence[np.ndarray]) -> np.ndarray:
    """Call `backend.features` and check the result against the backend's contract.

    A backend that returns the wrong grid or width would silently poison a memory bank, so the
    shape is validated here, once, for every backend.
    """
    if not images:
        raise ValueError("batch_features needs at least one image")
    result = backend.features(images)
    feats = np.stack([np.asarray(item, dtype=np.float32) for item in result])
    height, width = images[0].shape[:2]
    patch = backend.contract.patch_size
    expected = (len(images), height // patch, width // patch, backend.contract.embed_dim)
    if feats.shape != expected:
        raise ContractError(
            f"backend returned features of shape {feats.shape} for {len(images)} image(s) of "
            f"{height}x{width}; the contract ({backend.contract.arch}, patch {patch}) implies {expected}"
        )
    return feats
