"""The one definition of "dense features", from uint8 pixels to unit-norm patch vectors.

    uint8 [B, H, W, 3] RGB --(float, mean/std of the contract)--> backbone
      -> final-norm patch tokens as a [B, H/p, W/p, C] grid ("raw"; p: the contract's patch size)
      -> L2-normalised per patch ("features"), and the final-norm class token ("cls")

`DenseFeatureModel` is exactly what export puts in the ONNX graph, what the parity checks
compare with, and what the torch evaluation backend runs; training normalises its crops with
`normalize` and reads patch tokens with `patch_features`, so all stages agree by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neco.contract import ModelContract
from neco.model.backbone import Backbone


def normalize(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Standardise float pixels in [0, 1], channels first ([3, H, W] or [B, 3, H, W]).

    No default statistics: the caller passes its model contract's, so DINOv3 SAT-493M weights
    are never fed ImageNet-normalised pixels.
    """
    shape = (3, 1, 1) if pixels.dim() == 3 else (1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(shape)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(shape)
    return (pixels - mean_t) / std_t


def model_patch_size(model: nn.Module) -> int:
    """The square patch side of a timm ViT/Eva backbone (its patch embedding's, not a constant)."""
    rows, cols = model.patch_embed.patch_size
    if rows != cols:
        raise ValueError(f"non-square patches {rows}x{cols} are not supported")
    return int(rows)


def patch_features(model: Backbone, images: Tensor) -> tuple[Tensor, Tensor]:
    """Final-norm patch tokens as a [B, h, w, C] grid and the final-norm class token [B, C].

    `images` are float, already normalised with the contract's mean/std, with H and W multiples
    of the model's patch size. Prefix tokens (class + registers) are dropped from the grid.
    """
    batch, _, height, width = images.shape
    patch = model_patch_size(model)
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    tokens = model.forward_features(images)
    grid = tokens[:, model.num_prefix_tokens :].reshape(batch, height // patch, width // patch, -1)
    return grid, tokens[:, 0]


class DenseFeatureModel(nn.Module):
    """UINT8 [B, H, W, 3] images -> (L2-normalised features, raw features, CLS token).

    Normalisation constants are buffers scaled by 255 so that `(x - mean) / std` on the raw
    byte values equals `normalize` after dividing by 255 (what training does to its crops).
    """

    def __init__(self, backbone: nn.Module, contract: ModelContract) -> None:
        super().__init__()
        if model_patch_size(backbone) != contract.patch_size:
            raise ValueError(f"backbone patch {model_patch_size(backbone)} != contract patch {contract.patch_size}")
        self.backbone = backbone
        self.patch_size = contract.patch_size
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, height, width, _ = images.shape
        patch = self.patch_size
        rows, cols = height // patch, width // patch
        # Channels-last -> channels-first through a patch-grid view: the same single transpose
        # as a plain permute, but the Reshape fails at run time (in onnxruntime, TensorRT and
        # eager) when H or W is not a multiple of the patch, instead of silently cropping the border.
        # The Cast comes first because TensorRT only accepts UINT8 tensors at a Cast.
        tiles = images.to(torch.float32).reshape(batch, rows, patch, cols, patch, 3)
        pixels = tiles.permute(0, 5, 1, 2, 3, 4).reshape(batch, 3, rows * patch, cols * patch)
        grid, cls = patch_features(self.backbone, (pixels - self.mean) / self.std)
        return F.normalize(grid, dim=-1), grid, cls


def resolve_device(choice: str) -> torch.device:
    """`auto` -> CUDA when available; asking for CUDA without it is an error, not a fallback."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} requested but CUDA is not available")
    return torch.device(choice)
