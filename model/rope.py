"""DINOv3's rotary position embedding in a form `torch.export` keeps dynamic.

timm's `RotaryEmbeddingDinoV3` builds its patch-centre coordinates with `float(grid side)`
as the denominator. Under `torch.export` with a symbolic grid that conversion is traced as
the constant of the example input, so an ONNX graph exported at 224 x 224 silently computes
RoPE for a 14 x 14 grid at every size (measured: 3e-7 from PyTorch at the export size, 1e-3
elsewhere on a random DINOv3-S). `export_safe_rope` swaps in the same arithmetic with the
side kept as a (symbolic) integer, which the exporter turns into Shape/Range/Div nodes:
bit-for-bit equal in eager mode, dynamic in the graph, and without If/Loop nodes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import MethodType

import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch import Tensor, nn


def centred_coords(rows: int, cols: int) -> Tensor:
    """(rows * cols, 2) patch centres in [-1, 1], each axis normalised by its own side.

    The arithmetic of timm's `_build_grid(grid_type="centered", normalize_coords="separate")`
    (and Meta's RopePositionEmbedding): ((i + 0.5) / side) * 2 - 1, computed in float32.
    """
    ys = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    xs = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    return (2.0 * grid - 1.0).flatten(0, 1)


def _dynamic_get_embed(
    self: RotaryEmbeddingDinoV3, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """`RotaryEmbeddingDinoV3.get_embed` for eval-mode inference at any grid (no augmentation)."""
    rows, cols = shape if shape is not None else self.feat_shape
    sin, cos = self._get_pos_embed_from_coords(centred_coords(rows, cols))
    embed = torch.cat([sin, cos], dim=-1)
    return embed if dtype is None else embed.to(dtype=dtype)


def _supported(rope: RotaryEmbeddingDinoV3) -> None:
    settings = (rope.normalize_coords, rope.grid_offset, rope.grid_indexing)
    if settings != ("separate", 0.0, "ij"):
        raise ValueError(f"export_safe_rope supports DINOv3's RoPE settings only, got {settings}")


@contextmanager
def export_safe_rope(model: nn.Module) -> Iterator[int]:
    """Within the block, every DINOv3 RoPE in `model` computes its grid export-safely.

    Yields how many RoPE modules were swapped (0 for DINOv2, whose learned position
    embeddings export dynamically as they are); the originals are restored on exit.
    """
    ropes = [m for m in model.modules() if isinstance(m, RotaryEmbeddingDinoV3)]
    for rope in ropes:
        _supported(rope)
        rope.get_embed = MethodType(_dynamic_get_embed, rope)
    try:
        yield len(ropes)
    finally:
        for rope in ropes:
            del rope.get_embed
