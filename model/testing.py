"""Test and demo helpers: backbones that are random but exercise every block.

Production code never imports this module; tests, benchmarks and the parity checks of the
export fixtures do.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from neco.model.backbone import create_backbone


def random_backbone(arch: str, seed: int = 0) -> VisionTransformer:
    """A seeded random-init timm backbone whose transformer blocks actually matter.

    timm initialises DINOv2's LayerScale gammas to 1e-5, so a fresh model's features are
    just patch + position embeddings and any parity or quantisation check would pass
    without testing the blocks. Trained DINOv2 gammas are O(0.1-1); drawing them from
    U(0.2, 1) gives random weights on which parity and cosine numbers mean something.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_backbone(arch).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(torch.empty_like(param).uniform_(0.2, 1.0, generator=generator))
    return model
