"""Test and demo helpers: backbones that are random but exercise every block.

Production code never imports this module; tests, benchmarks and the parity checks of the
export fixtures do.
"""

from __future__ import annotations

import torch

from neco.model.backbone import Backbone, create_backbone
from neco.model.features import patch_features

_LAYER_SCALES = (".gamma", ".gamma_1", ".gamma_2")
"""LayerScale parameter names: timm's ViT (`ls1.gamma`, DINOv2) and Eva (`gamma_1`, DINOv3)."""


def random_backbone(arch: str, seed: int = 0) -> Backbone:
    """A seeded random-init timm backbone whose transformer blocks actually matter.

    timm initialises DINOv2's and DINOv3's LayerScale gammas to 1e-5, so a fresh model's
    features are just patch (+ position) embeddings and any parity or quantisation check
    would pass without testing the blocks. Trained gammas are O(0.1-1); drawing them from
    U(0.2, 1) gives random weights on which parity and cosine numbers mean something.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_backbone(arch).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(_LAYER_SCALES):
                param.copy_(torch.empty_like(param).uniform_(0.2, 1.0, generator=generator))
    return model


def assert_same_features(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor, atol: float = 1e-5) -> None:
    """Two backbones give the same patch grid and class token (a weight-format round trip kept them)."""
    with torch.no_grad():
        grid_a, cls_a = patch_features(a, images)
        grid_b, cls_b = patch_features(b, images)
    torch.testing.assert_close(grid_a, grid_b, rtol=0, atol=atol)
    torch.testing.assert_close(cls_a, cls_b, rtol=0, atol=atol)
