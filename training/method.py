"""The NeCo objective: patch-neighbour ordering consistency between student and teacher.

For each teacher global crop g and every other student view v, both patch-feature maps are
ROI-aligned over the pair's overlap to a 7x7 grid, so cell i of both grids looks at the same
image region. Each cell's similarities to the pair's reference patches are soft-sorted; the
student's soft permutation matrix is trained to match the teacher's (cross-entropy, the
teacher being a fixed target). Every step that changes the loss or its gradients follows the
public reference implementation; docs/training.md lists them and the tests that check them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from scipy import ndimage
from timm.layers import Attention, apply_rot_embed_cat, resample_abs_pos_embed
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.ops import roi_align

from neco.model.features import model_patch_size
from neco.training.head import ProjectionHead
from neco.training.sorting import SoftSorter

Similarity = Literal["cosine", "euclidean"]
MaskMode = Literal["all", "fg", "bg"]
Connectivity = Literal[4, 8]

MASK_BLUR_KERNEL = 7
MASK_BLUR_SIGMA = 0.6
SMALL_COMPONENT = 2
"""Foreground components of at most this many patches are removed."""


class NeCoNet(nn.Module):
    """Backbone + projection head producing a projected patch-feature map [B, D, h, w].

    The backbone is a timm DINOv2 `VisionTransformer` (learned absolute positions) or a DINOv3
    `Eva` (RoPE recomputed for every patch grid, passed to each block). `keep_registers=False`
    reproduces the reference implementation, which runs a DINOv2 register model without its
    register tokens during post-pretraining (the tokens stay in the weights and are exported
    untouched); the default keeps them, which is what the model sees at inference time.
    DINOv3 always keeps them: its attention skips RoPE on a fixed number of prefix tokens.
    """

    def __init__(self, backbone: VisionTransformer | Eva, head: ProjectionHead, keep_registers: bool = True) -> None:
        super().__init__()
        if isinstance(backbone, Eva) and not keep_registers:
            raise ValueError(
                "keep_registers=False is for DINOv2 register models only: DINOv3's attention applies RoPE "
                "after a fixed number of prefix tokens (class + registers), so they cannot be dropped"
            )
        self.backbone, self.head, self.keep_registers = backbone, head, keep_registers

    @property
    def patch_size(self) -> int:
        """Pixels per patch side, read from the backbone: the unit of crop sizes and ROI boxes."""
        return model_patch_size(self.backbone)

    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor | None, int, int, int]:
        """Tokens with positions, the RoPE table (None for DINOv2), prefix-token count and grid size."""
        bb = self.backbone
        x = bb.patch_embed(images)  # [B, h, w, C] because the model has dynamic_img_size
        batch, h, w, dim = x.shape
        if isinstance(bb, Eva):
            x, rope = bb._pos_embed(x)  # class + register tokens, RoPE for this h x w grid
            return bb.norm_pre(x), rope, bb.num_prefix_tokens, h, w
        if self.keep_registers or bb.reg_token is None:
            return bb.norm_pre(bb.patch_drop(bb._pos_embed(x))), None, bb.num_prefix_tokens, h, w
        # Register models are `no_embed_class`: position embeddings cover patches only.
        pos = resample_abs_pos_embed(
            bb.pos_embed, new_size=(h, w), old_size=bb.patch_embed.grid_size, num_prefix_tokens=0
        )
        x = x.reshape(batch, h * w, dim) + pos
        x = torch.cat([bb.cls_token.expand(batch, -1, -1), x], dim=1)
        return bb.norm_pre(bb.patch_drop(x)), None, 1, h, w

    def forward(self, *groups: Tensor) -> list[Tensor]:
        """Projected maps for several same-size image groups (global and local crops).

        One call for all groups, so DDP sees a single forward per backward.
        """
        return [self.encode(images)[0] for images in groups]

    def encode(self, images: Tensor, with_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """Projected map [B, D, h, w] and, if asked, the class token's attention map [B, h, w].

        The attention is the last block's class-token row over the patches, averaged over
        heads: the input of `foreground_mask` for the loss's 'fg'/'bg' modes.
        """
        bb = self.backbone
        x, rope, prefix, h, w = self._embed(images)
        blocks = list(bb.blocks)
        for block in blocks[:-1]:
            x = run_block(block, x, rope)
        attention = cls_attention(blocks[-1], x, prefix, rope).reshape(-1, h, w) if with_attention else None
        x = bb.norm(run_block(blocks[-1], x, rope))
        projected = self.head(x[:, prefix:])
        return projected.transpose(1, 2).reshape(x.shape[0], -1, h, w), attention


def run_block(block: nn.Module, x: Tensor, rope: Tensor | None) -> Tensor:
    """One transformer block; DINOv3's `EvaBlock` also takes the grid's RoPE table."""
    return block(x) if rope is None else block(x, rope=rope)


def at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision tensors as float32; float32/float64 as they are (the tests run in float64 too)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def cls_attention(block: nn.Module, x: Tensor, prefix: int, rope: Tensor | None = None) -> Tensor:
    """[B, N] softmax attention of the class token to each patch in `block`, mean over heads.

    `x` is the block's input and `prefix` the number of prefix tokens (class + registers) in it;
    they are excluded from the returned map. `rope` is DINOv3's RoPE table for the patch grid.
    """
    attn = block.attn
    q, k = _queries_and_keys(attn, block.norm1(x), rope)
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, prefix:]
    return weights.float().mean(1)


def _queries_and_keys(attn: nn.Module, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-head queries and keys [B, heads, N, d] exactly as the block's attention forms them.

    DINOv2's `Attention`: fused qkv, q/k norms. DINOv3's `EvaAttention`: fused (with separate
    q/v biases and a zero k bias) or split projections, q/k norms, then RoPE on every token after
    the attention's own prefix count. The softmax over q.k is left to the caller.
    """
    batch, tokens, _ = x.shape
    if isinstance(attn, EvaAttention):
        if attn.qkv is not None:
            bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = F.linear(x, attn.qkv.weight, bias).reshape(batch, tokens, 3, attn.num_heads, -1)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        else:
            q = attn.q_proj(x).reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(x).reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            skip, half = attn.num_prefix_tokens, attn.rotate_half
            q = torch.cat([q[:, :, :skip], apply_rot_embed_cat(q[:, :, skip:], rope, half=half)], 2).type_as(q)
            k = torch.cat([k[:, :, :skip], apply_rot_embed_cat(k[:, :, skip:], rope, half=half)], 2).type_as(k)
        return q, k
    if not isinstance(attn, Attention):
        raise TypeError(f"class-token attention is implemented for timm's Attention and EvaAttention, not {type(attn)}")
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    return attn.q_norm(qkv[:, :, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))


@torch.no_grad()
def foreground_mask(attention: Tensor, threshold: float, connectivity: Connectivity = 8) -> Tensor:
    """Binary float [B, h, w] foreground of class-token attention maps [B, h, w] (the reference's recipe).

    Gaussian blur (kernel 7, sigma 0.6, torchvision's reflect padding), then the patches holding
    the top `threshold` share of the blurred mass (ascending cumulative mass above
    1 - threshold, as DINO's visualisation does), then connected components of at most
    `SMALL_COMPONENT` patches are dropped: isolated specks are attention noise, not objects.
    """
    batch, h, w = attention.shape
    if min(h, w) <= MASK_BLUR_KERNEL // 2:
        raise ValueError(
            f"foreground masks need patch maps larger than {MASK_BLUR_KERNEL // 2} per side "
            f"(the blur's reflect padding), got {h}x{w}; use larger global crops or mask_mode='all'"
        )
    blurred = TF.gaussian_blur(at_least_fp32(attention)[:, None], [MASK_BLUR_KERNEL] * 2, [MASK_BLUR_SIGMA] * 2)
    values, order = blurred.flatten(1).sort(dim=-1)
    cumulative = (values / values.sum(-1, keepdim=True)).cumsum(-1)
    keep = torch.zeros_like(cumulative, dtype=torch.bool).scatter(-1, order, cumulative > 1 - threshold)
    return remove_small_components(keep.reshape(batch, h, w), connectivity).to(blurred.dtype)


def remove_small_components(masks: Tensor, connectivity: Connectivity = 8) -> Tensor:
    """Boolean [B, h, w] masks without their connected components of <= `SMALL_COMPONENT` cells."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    plane = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = plane  # one labelling call for the batch; images never connect to each other
    labels, _ = ndimage.label(masks.cpu().numpy(), structure=structure)
    sizes = np.bincount(labels.ravel())
    small = sizes <= SMALL_COMPONENT
    small[0] = True  # background stays background
    return torch.from_numpy(~small[labels]).to(masks.device)


def roi_grid(maps: Tensor, boxes: Tensor, flips: Tensor, size: int, patch_size: int) -> Tensor:
    """ROI-align `maps` [B, D, h, w] over pixel boxes [B, 4] to [B, size*size, D].

    The reference's call: boxes divided by the model's patch size (pixels per map cell),
    `spatial_scale=1`, the default adaptive `sampling_ratio` and `aligned=True`, so aligning a
    full `size` x `size` map returns it exactly. Grids of mirrored crops are mirrored back so
    that cell i means the same image region in every view.
    """
    # fp32 or better throughout: bf16 box coordinates would be off by pixels at 224-px crops.
    maps = at_least_fp32(maps)
    cells = boxes.to(device=maps.device, dtype=maps.dtype) / patch_size
    rois = torch.cat([torch.arange(len(cells), device=maps.device, dtype=maps.dtype)[:, None], cells], 1)
    grid = roi_align(maps, rois, output_size=size, spatial_scale=1.0, aligned=True)
    grid = torch.where(flips.to(maps.device)[:, None, None, None], grid.flip(-1), grid)
    return grid.flatten(2).transpose(1, 2)


def similarity(patches: Tensor, references: Tensor, kind: Similarity) -> Tensor:
    """[B, P, D] x [B, R, D] -> [B, P, R]: cosine similarity, or euclidean distance (sorted as is)."""
    if kind == "cosine":
        return F.normalize(patches, dim=-1) @ F.normalize(references, dim=-1).transpose(1, 2)
    if kind == "euclidean":
        return torch.cdist(patches, references)
    raise ValueError(f"unknown similarity {kind!r}; use 'cosine' or 'euclidean'")


def crop_pairs(num_globals: int, num_views: int) -> list[tuple[int, int]]:
    """The compared (teacher global crop g, student view v != g) pairs, in the loss's order."""
    return [(g, v) for g in range(num_globals) for v in range(num_views) if v != g]


class NeCoLoss(nn.Module):
    """Cross-entropy between teacher and student soft permutations, averaged over crop pairs.

    Per pair (teacher global crop g, student view v): both maps are ROI-aligned over the pair's
    overlap, every cell's similarities to the pair's references are soft-sorted, and the loss
    is -mean over cells of sum_j q_j log p_j (q: teacher, no grad; p: student). Per global
    crop the pair losses are summed and divided by (views - 1); the result is the mean over
    global crops. Mask modes 'fg'/'bg' average only over cells inside the teacher's
    (inverted, for 'bg') foreground mask; a pair without such cells contributes 0.
    `patch_size` is the model's (14 for DINOv2, 16 for DINOv3): pixel boxes become map cells.
    """

    def __init__(
        self,
        student_sorter: SoftSorter,
        teacher_sorter: SoftSorter,
        *,
        patch_size: int,
        similarity: Similarity = "cosine",
        grid_size: int = 7,
        mask_mode: MaskMode = "all",
        mask_threshold: float = 0.6,
        mask_connectivity: Connectivity = 8,
    ) -> None:
        super().__init__()
        if mask_mode not in ("all", "fg", "bg"):
            raise ValueError(f"unknown mask_mode {mask_mode!r}; use 'all', 'fg' or 'bg'")
        self.student_sorter, self.teacher_sorter = student_sorter, teacher_sorter
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
        self.similarity, self.grid_size, self.mask_mode = similarity, grid_size, mask_mode
        self.patch_size = patch_size
        self.mask_threshold, self.mask_connectivity = mask_threshold, mask_connectivity

    @property
    def _cells(self) -> tuple[int, int]:
        """`roi_grid`'s (output side, pixels per map cell)."""
        return self.grid_size, self.patch_size

    def _order(self, sorter: SoftSorter, patches: Tensor, references: Tensor) -> Tensor:
        with torch.autocast(patches.device.type, enabled=False):  # sorting needs fp32 margins
            patches = at_least_fp32(patches)
            sims = similarity(patches, references.to(patches.dtype), self.similarity)
            return sorter(sims)[1]

    def forward(
        self,
        student_maps: list[Tensor],
        teacher_maps: list[Tensor],
        boxes: Tensor,
        flips: Tensor,
        references: Tensor,
        teacher_masks: list[Tensor] | None = None,
    ) -> Tensor:
        """The NeCo loss of one batch.

        `student_maps[v]` [B, D, h_v, w_v]; `teacher_maps[g]` [B, D, h, w] (no grad);
        `boxes` [B, G, V, 2, 4] (box in g, box in v); `flips` [B, V];
        `references` [pairs, B, R, D], one set per pair in `crop_pairs(G, V)` order;
        `teacher_masks[g]` [B, h, w] from `patch_masks`, required for 'fg' and 'bg'.
        """
        if self.mask_mode != "all" and teacher_masks is None:
            raise ValueError(f"mask_mode={self.mask_mode!r} needs the teacher's patch masks (patch_masks)")
        pairs = crop_pairs(len(teacher_maps), len(student_maps))
        if references.shape[0] != len(pairs):
            raise ValueError(f"references hold {references.shape[0]} sets, expected one per pair ({len(pairs)})")
        refs = references.detach().flatten(0, 1)  # [pairs * B, R, D]
        # All pairs go through the sorter in one call each for teacher and student: the
        # sorting network is launch-bound at these sizes, so batching is what makes it cheap.
        with torch.no_grad():
            t = torch.cat(
                [roi_grid(teacher_maps[g].detach(), boxes[:, g, v, 0], flips[:, g], *self._cells) for g, v in pairs]
            )
            target = self._order(self.teacher_sorter, t, refs)
        s = torch.cat([roi_grid(student_maps[v], boxes[:, g, v, 1], flips[:, v], *self._cells) for g, v in pairs])
        pred = self._order(self.student_sorter, s, refs)
        # log p as the reference takes it (no 1e-8 floor: with 49 references, euclidean distances put
        # entries below 1e-8, where a floor moved gradients by 2e-4 - 5e-3); only an entry that underflowed
        # below the smallest normal number is raised to it, so an exact 0 gives a finite loss, not NaN.
        per_cell = -(target * pred.clamp_min(torch.finfo(pred.dtype).tiny).log()).sum(-1).mean(-1)  # [pairs * B, P]
        per_pair = per_cell.reshape(len(pairs), -1, per_cell.shape[-1])
        weights = self._cell_weights(pairs, boxes, flips, teacher_masks)
        if weights is None:
            pair_losses = per_pair.mean((1, 2))
        else:
            pair_losses = (per_pair * weights).sum((1, 2)) / weights.sum((1, 2)).clamp_min(1.0)
        return pair_losses.sum() / (len(student_maps) - 1) / len(teacher_maps)

    @torch.no_grad()
    def patch_masks(self, attention: list[Tensor] | None) -> list[Tensor] | None:
        """Per global crop, the 0/1 [B, h, w] patches the mask mode keeps (None for 'all').

        'bg' inverts the foreground before anything is aligned, as the reference does; the
        trainer also restricts the reference patches to these masks.
        """
        if self.mask_mode == "all" or attention is None:
            return None
        masks = [foreground_mask(a, self.mask_threshold, self.mask_connectivity) for a in attention]
        return [1.0 - m for m in masks] if self.mask_mode == "bg" else masks

    @torch.no_grad()
    def _cell_weights(
        self, pairs: list[tuple[int, int]], boxes: Tensor, flips: Tensor, masks: list[Tensor] | None
    ) -> Tensor | None:
        """[pairs, B, P] 0/1 weights: cells whose aligned teacher mask is entirely 1."""
        if self.mask_mode == "all" or masks is None:
            return None
        aligned = [roi_grid(masks[g][:, None], boxes[:, g, v, 0], flips[:, g], *self._cells)[..., 0] for g, v in pairs]
        return (torch.stack(aligned) >= 1.0).to(aligned[0].dtype)
