"""The NeCo objective: patch-neighbour ordering consistency between student and teacher.

For each teacher global crop g and every other student view v, both patch-feature maps are
ROI-aligned over the pair's overlap to a 7x7 grid, so cell i of both grids looks at the same
image region. Each cell's similarities to a shared set of reference patches are soft-sorted;
the student's soft permutation matrix is trained to match the teacher's (cross-entropy, the
teacher being a fixed target).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.ops import roi_align

from neco.contract import PATCH_SIZE
from neco.training.head import ProjectionHead
from neco.training.sorting import SoftSorter

Similarity = Literal["cosine", "euclidean"]
MaskMode = Literal["all", "fg", "bg"]


class NeCoNet(nn.Module):
    """Backbone + projection head producing a projected patch-feature map [B, D, h, w].

    `keep_registers=False` reproduces the reference implementation, which runs a register
    model without its register tokens during post-pretraining (the tokens stay in the weights
    and are exported untouched); the default keeps them, which is what the model sees at
    inference time.
    """

    def __init__(self, backbone: VisionTransformer, head: ProjectionHead, keep_registers: bool = True) -> None:
        super().__init__()
        self.backbone, self.head, self.keep_registers = backbone, head, keep_registers

    def _embed(self, images: Tensor) -> tuple[Tensor, int, int, int]:
        bb = self.backbone
        x = bb.patch_embed(images)  # [B, h, w, C] because the model has dynamic_img_size
        batch, h, w, dim = x.shape
        if self.keep_registers or bb.reg_token is None:
            return bb._pos_embed(x), bb.num_prefix_tokens, h, w
        # Register models are `no_embed_class`: position embeddings cover patches only.
        pos = resample_abs_pos_embed(
            bb.pos_embed, new_size=(h, w), old_size=bb.patch_embed.grid_size, num_prefix_tokens=0
        )
        x = x.reshape(batch, h * w, dim) + pos
        return torch.cat([bb.cls_token.expand(batch, -1, -1), x], dim=1), 1, h, w

    def forward(self, *groups: Tensor) -> list[Tensor]:
        """Projected maps for several same-size image groups (global and local crops).

        One call for all groups, so DDP sees a single forward per backward.
        """
        return [self.encode(images)[0] for images in groups]

    def encode(self, images: Tensor, attention_mask_threshold: float | None = None) -> tuple[Tensor, Tensor | None]:
        """Projected map [B, D, h, w] and, if a threshold is given, a foreground mask [B, h, w].

        The mask keeps the patches holding the top `threshold` share of the class token's
        last-layer attention (mean over heads), the DINO recipe for salient regions.
        """
        bb = self.backbone
        x, prefix, h, w = self._embed(images)
        x = bb.norm_pre(bb.patch_drop(x))
        blocks = list(bb.blocks)
        for block in blocks[:-1]:
            x = block(x)
        mask = None
        if attention_mask_threshold is not None:
            mask = attention_foreground(blocks[-1], x, prefix, attention_mask_threshold).reshape(-1, h, w)
        x = bb.norm(blocks[-1](x))
        projected = self.head(x[:, prefix:])
        return projected.transpose(1, 2).reshape(x.shape[0], -1, h, w), mask


@torch.no_grad()
def attention_foreground(block: nn.Module, x: Tensor, prefix: int, threshold: float) -> Tensor:
    """Boolean [B, N] mask of patches carrying the top `threshold` of class-token attention."""
    attn = block.attn
    batch, tokens, dim = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, dim // attn.num_heads)
    q, k = attn.q_norm(qkv[:, :, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, prefix:].mean(1)
    values, order = weights.float().sort(dim=-1, descending=True)
    cumulative = values.cumsum(-1) / values.sum(-1, keepdim=True)
    keep_sorted = cumulative - values / values.sum(-1, keepdim=True) < threshold  # include the crossing patch
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def roi_grid(
    maps: Tensor, boxes: Tensor, flips: Tensor, size: int = 7, spatial_scale: float = 1.0 / PATCH_SIZE
) -> Tensor:
    """ROI-align `maps` [B, D, h, w] over pixel boxes [B, 4] to [B, size*size, D].

    Boxes are in the crop's pixel coordinates; a patch map has one cell per 14-px patch, hence
    the default `spatial_scale=1/14`, and `aligned=True` puts sample points at true pixel centres. Grids of
    mirrored crops are mirrored back so that cell i means the same image region in every view.
    """
    # fp32 throughout: bf16 box coordinates would be off by pixels at 224-px crops.
    boxes = boxes.to(device=maps.device, dtype=torch.float32)
    rois = torch.cat([torch.arange(len(boxes), device=maps.device, dtype=torch.float32)[:, None], boxes], 1)
    grid = roi_align(maps.float(), rois, output_size=size, spatial_scale=spatial_scale, sampling_ratio=2, aligned=True)
    grid = torch.where(flips.to(maps.device)[:, None, None, None], grid.flip(-1), grid)
    return grid.flatten(2).transpose(1, 2)


def similarity(patches: Tensor, references: Tensor, kind: Similarity) -> Tensor:
    """[B, P, D] x [B, R, D] -> [B, P, R]: cosine similarity or negative euclidean distance."""
    if kind == "cosine":
        return F.normalize(patches, dim=-1) @ F.normalize(references, dim=-1).transpose(1, 2)
    if kind == "euclidean":
        return -torch.cdist(patches, references)
    raise ValueError(f"unknown similarity {kind!r}; use 'cosine' or 'euclidean'")


class NeCoLoss(nn.Module):
    """Cross-entropy between teacher and student soft permutations, averaged over crop pairs."""

    def __init__(
        self,
        student_sorter: SoftSorter,
        teacher_sorter: SoftSorter,
        *,
        similarity: Similarity = "cosine",
        grid_size: int = 7,
        mask_mode: MaskMode = "all",
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.student_sorter, self.teacher_sorter = student_sorter, teacher_sorter
        self.similarity, self.grid_size, self.mask_mode, self.eps = similarity, grid_size, mask_mode, eps

    def _order(self, sorter: SoftSorter, patches: Tensor, references: Tensor) -> Tensor:
        with torch.autocast(patches.device.type, enabled=False):  # sorting needs fp32 margins
            sims = similarity(patches.float(), references.float(), self.similarity)
            return sorter(sims)[1]

    def forward(
        self,
        student_maps: list[Tensor],
        teacher_maps: list[Tensor],
        boxes: Tensor,
        flips: Tensor,
        references: list[Tensor],
        teacher_fg: list[Tensor] | None = None,
    ) -> Tensor:
        """Mean loss over all (teacher global g, student view v != g) pairs.

        `student_maps[v]` [B, D, h_v, w_v]; `teacher_maps[g]` [B, D, h, w] (no grad);
        `boxes` [B, 2, V, 2, 4]; `flips` [B, V]; `references[g]` [B, R, D];
        `teacher_fg[g]` [B, h, w] foreground masks, required for mask modes 'fg' and 'bg'.
        """
        if self.mask_mode != "all" and teacher_fg is None:
            raise ValueError(f"mask_mode={self.mask_mode!r} needs teacher foreground masks")
        pairs = [(g, v) for g in range(len(teacher_maps)) for v in range(len(student_maps)) if v != g]
        # All pairs go through the sorter in one call each for teacher and student: the
        # sorting network is launch-bound at these sizes, so batching is what makes it cheap.
        with torch.no_grad():
            t = torch.cat(
                [roi_grid(teacher_maps[g].detach(), boxes[:, g, v, 0], flips[:, g], self.grid_size) for g, v in pairs]
            )
            refs = torch.cat([references[g].detach() for g, _ in pairs])
            target = self._order(self.teacher_sorter, t, refs)
        s = torch.cat([roi_grid(student_maps[v], boxes[:, g, v, 1], flips[:, v], self.grid_size) for g, v in pairs])
        pred = self._order(self.student_sorter, s, refs)
        per_patch = -(target * pred.clamp_min(self.eps).log()).sum(-1).mean(-1)  # [pairs * B, P]
        per_pair = per_patch.reshape(len(pairs), -1, per_patch.shape[-1])
        losses = [self._reduce(per_pair[i], g, v, boxes, flips, teacher_fg) for i, (g, v) in enumerate(pairs)]
        return torch.stack(losses).mean()

    def _reduce(
        self, per_patch: Tensor, g: int, v: int, boxes: Tensor, flips: Tensor, fg: list[Tensor] | None
    ) -> Tensor:
        if self.mask_mode == "all" or fg is None:
            return per_patch.mean()
        with torch.no_grad():
            soft = roi_grid(fg[g][:, None].float(), boxes[:, g, v, 0], flips[:, g], self.grid_size)[..., 0]
            weight = (soft > 0.5).float()
            if self.mask_mode == "bg":
                weight = 1.0 - weight
        return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
