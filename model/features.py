"""The one definition of "dense features", from uint8 pixels to unit-norm patch vectors.

    uint8 [B, H, W, 3] RGB --(float, ImageNet mean/std of the contract)--> backbone
      -> final-norm patch tokens as a [B, H/14, W/14, C] grid ("raw")
      -> L2-normalised per patch ("features"), and the final-norm class token ("cls")

`DenseFeatureModel` is exactly what export puts in the ONNX graph, what the parity checks
compare with, and what the torch evaluation backend runs; training normalises its crops with
`normalize` and reads patch tokens with `patch_features`, so all stages agree by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from neco.contract import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, ModelContract


def normalize(pixels: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """Standardise float pixels in [0, 1], channels first ([3, H, W] or [B, 3, H, W])."""
    shape = (3, 1, 1) if pixels.dim() == 3 else (1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(shape)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(shape)
    return (pixels - mean_t) / std_t


def patch_features(model: VisionTransformer, images: Tensor) -> tuple[Tensor, Tensor]:
    """Final-norm patch tokens as a [B, h, w, C] grid and the final-norm class token [B, C].

    `images` are float, already normalised with the contract's mean/std, with H and W multiples
    of the patch size. Prefix tokens (class + registers) are dropped from the grid.
    """
    batch, _, height, width = images.shape
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {PATCH_SIZE}")
    tokens = model.forward_features(images)
    grid = tokens[:, model.num_prefix_tokens :].reshape(batch, height // PATCH_SIZE, width // PATCH_SIZE, -1)
    return grid, tokens[:, 0]


class DenseFeatureModel(nn.Module):
    """UINT8 [B, H, W, 3] images -> (L2-normalised features, raw features, CLS token).

    Normalisation constants are buffers scaled by 255 so that `(x - mean) / std` on the raw
    byte values equals `normalize` after dividing by 255 (what training does to its crops).
    """

    def __init__(self, backbone: nn.Module, contract: ModelContract) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, height, width, _ = images.shape
        rows, cols = height // PATCH_SIZE, width // PATCH_SIZE
        # Channels-last -> channels-first through a patch-grid view: the same single transpose
        # as a plain permute, but the Reshape fails at run time (in onnxruntime, TensorRT and
        # eager) when H or W is not a multiple of 14, instead of silently cropping the border.
        # The Cast comes first because TensorRT only accepts UINT8 tensors at a Cast.
        tiles = images.to(torch.float32).reshape(batch, rows, PATCH_SIZE, cols, PATCH_SIZE, 3)
        pixels = tiles.permute(0, 5, 1, 2, 3, 4).reshape(batch, 3, rows * PATCH_SIZE, cols * PATCH_SIZE)
        grid, cls = patch_features(self.backbone, (pixels - self.mean) / self.std)
        return F.normalize(grid, dim=-1), grid, cls


def resolve_device(choice: str) -> torch.device:
    """`auto` -> CUDA when available; asking for CUDA without it is an error, not a fallback."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} requested but CUDA is not available")
    return torch.device(choice)
