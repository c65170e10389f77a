"""Client-test helpers: a numpy feature backend with known behaviour, scenes, a tiny mIoU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from neco.contract import IGNORE_INDEX, ModelContract
from neco.scenes import generate_scene

ARCH = "vit_small_patch14_reg4_dinov2"
FORBIDDEN = ("torch", "torchvision", "timm", "onnxruntime", "onnx", "pytriton", "safetensors", "tensorboard")
"""Packages the client must never import (it ships without them)."""


class ColourBackend:
    """FeatureBackend whose patch feature is a fixed random lift of the patch's mean colour.

    Patches of similar colour get similar features, so the right answer of bank/segment tests
    on colour-coded scenes is known without any neural network. `calls` records batch shapes.
    """

    def __init__(self, contract: ModelContract | None = None, seed: int = 0) -> None:
        self.contract = contract or ModelContract.for_arch(ARCH)
        rng = np.random.default_rng(seed)
        self.lift = rng.standard_normal((4, self.contract.embed_dim)).astype(np.float32) * 3
        self.calls: list[tuple[int, ...]] = []

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack(images).astype(np.float32) / 255.0
        self.calls.append(batch.shape)
        b, h, w, _ = batch.shape
        p = self.contract.patch_size
        mean = batch.reshape(b, h // p, p, w // p, p, 3).mean(axis=(2, 4))
        lifted = np.tanh(np.concatenate([mean, np.ones_like(mean[..., :1])], axis=-1) @ self.lift)
        return lifted / np.linalg.norm(lifted, axis=-1, keepdims=True)


def miou(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean IoU over the classes present in `target` (ignore pixels excluded); test-only."""
    valid = target != IGNORE_INDEX
    ious = []
    for label in np.unique(target[valid]):
        p, t = (pred == label) & valid, (target == label) & valid
        ious.append((p & t).sum() / (p | t).sum())
    return float(np.mean(ious))


@pytest.fixture
def colour_backend() -> ColourBackend:
    return ColourBackend()


@pytest.fixture
def scenes_224() -> list[tuple[np.ndarray, np.ndarray]]:
    """Four seeded 224x224 scenes with 4 classes (image uint8 HxWx3, mask uint8 HxW)."""
    rng = np.random.default_rng(7)
    return [generate_scene(rng, size=(224, 224), num_classes=4) for _ in range(4)]
