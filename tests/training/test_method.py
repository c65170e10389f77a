"""ROI alignment, attention masks, the NeCo loss, the teacher EMA and the reference queue."""

from __future__ import annotations

import math

import pytest
import torch

from neco.model import patch_features
from neco.training.ema import ema_update, make_teacher, momentum_at
from neco.training.head import ProjectionHead
from neco.training.method import (
    NeCoLoss,
    NeCoNet,
    cls_attention,
    crop_pairs,
    foreground_mask,
    remove_small_components,
    roi_grid,
    similarity,
)
from neco.training.reference_queue import ReferenceQueue
from neco.training.sorting import SoftSorter
from tests.training.tiny import one_thread, tiny_backbone  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "vit_small_patch14_reg4_dinov2"


def _net(seed: int = 0, keep_registers: bool = True) -> NeCoNet:
    torch.manual_seed(seed)
    backbone = tiny_backbone(ARCH)
    with torch.no_grad():  # trained-like magnitudes: timm initialises these near zero
        backbone.reg_token.normal_()
        for name, param in backbone.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
    return NeCoNet(backbone, ProjectionHead(384, 64, 32), keep_registers=keep_registers)


def test_roi_grid_on_patch_aligned_box_returns_those_patches() -> None:
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    maps = torch.stack([10 * ys + xs, ys - xs])[None]  # [1, 2, 8, 8], linear in the cell index
    box = torch.tensor([[2 * 14.0, 1 * 14.0, 6 * 14.0, 5 * 14.0]])  # patches x 2..5, y 1..4
    grid = roi_grid(maps, box, torch.tensor([False]), size=4, patch_size=14)
    torch.testing.assert_close(grid[0], maps[0, :, 1:5, 2:6].flatten(1).T)
    mirrored = roi_grid(maps, box, torch.tensor([True]), size=4, patch_size=14)
    torch.testing.assert_close(mirrored[0], maps[0, :, 1:5, 2:6].flip(-1).flatten(1).T)


@pytest.mark.parametrize("patch", [14, 16])
def test_roi_grid_of_a_full_map_is_that_map(patch: int) -> None:
    """The reference's call (boxes / patch, spatial_scale 1, adaptive sampling, aligned) is exact here."""
    for cells in (7, 14, 16):
        maps = torch.randn(3, 5, cells, cells)
        box = torch.tensor([[0.0, 0.0, cells * patch, cells * patch]], dtype=torch.float32).expand(3, 4)
        grid = roi_grid(maps, box, torch.zeros(3, dtype=torch.bool), size=cells, patch_size=patch)
        assert torch.equal(grid, maps.flatten(2).transpose(1, 2))


def test_roi_grid_divides_boxes_by_the_given_patch_size() -> None:
    """A 16-px-patch map read with 14-px cells would look at the wrong patches."""
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    maps = (10 * ys + xs)[None, None]
    box = torch.tensor([[2 * 16.0, 1 * 16.0, 6 * 16.0, 5 * 16.0]])  # patches x 2..5, y 1..4 at patch 16
    grid = roi_grid(maps, box, torch.tensor([False]), size=4, patch_size=16)
    torch.testing.assert_close(grid[0, :, 0], maps[0, 0, 1:5, 2:6].flatten())
    assert not torch.allclose(roi_grid(maps, box, torch.tensor([False]), size=4, patch_size=14), grid)


def test_similarity_kinds() -> None:
    a, b = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    cos = similarity(a, b, "cosine")
    torch.testing.assert_close(cos[1, 2, 0], torch.nn.functional.cosine_similarity(a[1, 2], b[1, 0], dim=0))
    torch.testing.assert_close(similarity(a, b, "euclidean")[0, 1, 2], (a[0, 1] - b[0, 2]).norm())  # distances
    with pytest.raises(ValueError, match="unknown similarity"):
        similarity(a, b, "dot")  # type: ignore[arg-type]


def test_net_features_match_the_shared_definition() -> None:
    net = _net().eval()
    images = torch.randn(2, 3, 42, 56)
    maps, _ = net.encode(images)
    grid, _ = patch_features(net.backbone, images)
    torch.testing.assert_close(maps, net.head(grid).permute(0, 3, 1, 2))


def test_dropping_registers_equals_a_model_without_them() -> None:
    net = _net(keep_registers=False).eval()
    images = torch.randn(2, 3, 42, 42)
    maps, _ = net.encode(images)
    stripped = tiny_backbone(ARCH)
    stripped.load_state_dict(net.backbone.state_dict())
    stripped.reg_token, stripped.num_prefix_tokens, stripped.num_reg_tokens = None, 1, 0
    grid, _ = patch_features(stripped, images)
    torch.testing.assert_close(maps, net.head(grid).permute(0, 3, 1, 2))
    kept, _ = _net(keep_registers=True).eval().encode(images)
    assert not torch.allclose(maps, kept)


def test_cls_attention_is_a_distribution_over_patches() -> None:
    net = _net().eval()
    images = torch.randn(2, 3, 70, 84)
    maps, attention = net.encode(images, with_attention=True)
    assert attention is not None and attention.shape == (2, 5, 6) and maps.shape[-2:] == (5, 6)
    x, _, prefix, _, _ = net._embed(images)
    for block in list(net.backbone.blocks)[:-1]:
        x = block(x)
    torch.testing.assert_close(cls_attention(net.backbone.blocks[-1], x, prefix).reshape(2, 5, 6), attention)
    assert (attention > 0).all() and (attention.flatten(1).sum(1) < 1).all()  # prefix tokens take the rest
    assert net.encode(images)[1] is None


def test_foreground_mask_keeps_the_attended_blob_and_drops_specks() -> None:
    attention = torch.full((1, 8, 8), 1e-3)
    attention[0, 2:5, 2:5] = 1.0  # a 3x3 object
    mask = foreground_mask(attention, 0.6)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask[0, 3, 3] == 1 and mask[0, 7, 7] == 0 and mask[0, 0, 7] == 0
    assert foreground_mask(attention, 1.0).all()  # all the mass: every patch
    with pytest.raises(ValueError, match="larger than 3 per side"):
        foreground_mask(torch.rand(1, 3, 3), 0.6)


def test_small_components_depend_on_connectivity() -> None:
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 2] = True  # a diagonal line of 3
    masks[0, 4:6, 4:6] = True  # a 2x2 block: 4 cells, kept either way
    masks[1, 0, 0:2] = True  # 2 cells: removed either way
    eight, four = remove_small_components(masks, 8), remove_small_components(masks, 4)
    assert eight[0, :3, :3].sum() == 3 and four[0, :3, :3].sum() == 0
    assert eight[0, 4:, 4:].all() and four[0, 4:, 4:].all() and not eight[1].any() and not four[1].any()
    with pytest.raises(ValueError, match="connectivity"):
        remove_small_components(masks, 6)  # type: ignore[arg-type]


def _loss_inputs(student: NeCoNet, teacher: NeCoNet) -> tuple:
    torch.manual_seed(5)
    globals_, locals_ = torch.randn(4, 3, 56, 56), torch.randn(2, 3, 28, 28)
    s_maps = student(globals_, locals_)
    with torch.no_grad():
        t_maps, attention = teacher.encode(globals_, with_attention=True)
    boxes = torch.tensor([[0.0, 0.0, 42.0, 42.0]]).expand(2, 2, 3, 2, 4).clone()
    boxes[:, :, 2, 1] = torch.tensor([0.0, 0.0, 28.0, 28.0])  # the whole local crop
    flips = torch.tensor([[False, True, False], [True, False, False]])
    refs = torch.randn(4, 2, 8, 32)
    return list(s_maps[0].chunk(2)) + [s_maps[1]], list(t_maps.chunk(2)), boxes, flips, refs, list(attention.chunk(2))


@pytest.mark.parametrize("mask_mode", ["all", "fg", "bg"])
def test_loss_gradients_reach_only_the_student(mask_mode: str) -> None:
    student = _net(1).train()
    teacher = make_teacher(student)
    sorter = SoftSorter(steepness=100.0)
    loss_fn = NeCoLoss(sorter, sorter, patch_size=14, grid_size=3, mask_mode=mask_mode)  # type: ignore[arg-type]
    s_maps, t_maps, boxes, flips, refs, attention = _loss_inputs(student, teacher)
    refs.requires_grad_(True)
    loss = loss_fn(s_maps, t_maps, boxes, flips, refs, loss_fn.patch_masks(attention))
    assert loss.ndim == 0 and math.isfinite(loss.detach().item()) and loss.detach().item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert refs.grad is None  # references are targets, never trained towards
    assert student.head.mlp[0].weight.grad.abs().sum() > 0
    assert student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_loss_is_cross_entropy_of_permutations() -> None:
    """Identical student and teacher: the loss is the entropy of the teacher's permutations,
    computed here independently from the sorter's matrices."""
    sorter = SoftSorter(steepness=10.0)
    loss_fn = NeCoLoss(sorter, sorter, patch_size=14, grid_size=2)
    maps = [torch.randn(1, 4, 3, 3) for _ in range(2)]
    boxes = torch.tensor([0.0, 0.0, 42.0, 42.0]).expand(1, 2, 2, 2, 4).clone()
    flips = torch.zeros(1, 2, dtype=torch.bool)
    refs = torch.randn(2, 1, 4, 4)
    loss = loss_fn(maps, maps, boxes, flips, refs)
    expected = []
    for i, (g, v) in enumerate(crop_pairs(2, 2)):
        perm = sorter(similarity(roi_grid(maps[g], boxes[:, g, v, 0], flips[:, g], 2, 14), refs[i], "cosine"))[1]
        perm_v = sorter(similarity(roi_grid(maps[v], boxes[:, g, v, 1], flips[:, v], 2, 14), refs[i], "cosine"))[1]
        expected.append(-(perm * perm_v.clamp_min(1e-8).log()).sum(-1).mean())
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    with pytest.raises(ValueError, match="one per pair"):
        loss_fn(maps, maps, boxes, flips, refs[:1])
    with pytest.raises(ValueError, match="patch masks"):
        NeCoLoss(sorter, sorter, patch_size=14, grid_size=2, mask_mode="fg")(maps, maps, boxes, flips, refs)


def test_ema_schedule_and_update() -> None:
    assert momentum_at(0, 100) == pytest.approx(0.9995)
    assert momentum_at(50, 100) == pytest.approx(0.99975)
    assert momentum_at(100, 100) == pytest.approx(1.0)
    student = torch.nn.Linear(3, 2)
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = teacher.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, 0.9 * before + 0.1 * student.weight)
    ema_update(teacher, student, 1.0)
    torch.testing.assert_close(teacher.weight, 0.9 * before + 0.1 * student.weight)


def test_queue_fifo_full_and_state() -> None:
    queue = ReferenceQueue(2, 5, 2)
    queue.push(0, torch.arange(6.0).reshape(3, 2))
    assert not queue.full(0) and queue.count == [3, 0]
    queue.push(0, torch.arange(6.0, 14.0).reshape(4, 2))  # wraps: oldest two are overwritten
    assert queue.full(0) and queue.pointer[0] == 2
    assert queue.buffer[0, :, 0].tolist() == [10.0, 12.0, 4.0, 6.0, 8.0]
    batch = -1.0 - torch.arange(24.0).reshape(3, 4, 2)
    drawn = queue.references(1, batch, 3, draws=4)  # empty queue: drawn from the batch
    assert drawn.shape == (4, 3, 3, 2) and (drawn < 0).all()
    for pair in drawn:  # without replacement within a pair, fresh per pair
        assert len(set(pair[..., 0].flatten().tolist())) == 9
    assert not all(torch.equal(drawn[0], d) for d in drawn[1:])
    refs = queue.references(0, batch, 6)  # 18 > 5 queued: with replacement
    assert refs.shape == (1, 3, 6, 2) and set(refs[..., 0].flatten().tolist()) <= {10.0, 12.0, 4.0, 6.0, 8.0}
    other = ReferenceQueue(2, 5, 2)
    other.load_state_dict(queue.state_dict())
    assert torch.equal(other.buffer, queue.buffer) and other.pointer == queue.pointer and other.count == queue.count
    with pytest.raises(ValueError, match="shape"):
        ReferenceQueue(2, 4, 2).load_state_dict(queue.state_dict())
    queue.push_from(1, torch.randn(3, 4, 2), 2, gather=lambda t: torch.cat([t, t]))
    assert queue.count[1] == 5  # 3 images x 2 patches x 2 "ranks" = 12, capped at the length


def test_queue_masked_draws_and_pushes_use_only_masked_patches() -> None:
    queue = ReferenceQueue(1, 8, 1)
    patches = torch.arange(12.0).reshape(2, 6, 1)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = True  # patches 1.0 and 10.0
    drawn = queue.references(0, patches, 3, draws=2, mask=mask)
    assert drawn.shape == (2, 2, 3, 1) and set(drawn.flatten().tolist()) <= {1.0, 10.0}
    queue.push_from(0, patches, 2, gather=lambda t: t, mask=mask)
    assert queue.count == [4] and set(queue.buffer[0, :4, 0].tolist()) <= {1.0, 10.0}
    empty = torch.zeros(2, 6, dtype=torch.bool)  # nothing masked: every patch is a candidate
    assert queue.references(0, patches, 3, mask=empty).shape == (1, 2, 3, 1)
