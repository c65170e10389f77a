"""ROI alignment, attention masks, the NeCo loss, the teacher EMA and the reference queue."""

from __future__ import annotations

import math

import pytest
import torch

from neco.model import patch_features
from neco.training.ema import ema_update, make_teacher, momentum_at
from neco.training.head import ProjectionHead
from neco.training.method import NeCoLoss, NeCoNet, attention_foreground, roi_grid, similarity
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
    grid = roi_grid(maps, box, torch.tensor([False]), size=4)
    torch.testing.assert_close(grid[0], maps[0, :, 1:5, 2:6].flatten(1).T)
    mirrored = roi_grid(maps, box, torch.tensor([True]), size=4)
    torch.testing.assert_close(mirrored[0], maps[0, :, 1:5, 2:6].flip(-1).flatten(1).T)


def test_similarity_kinds() -> None:
    a, b = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    cos = similarity(a, b, "cosine")
    torch.testing.assert_close(cos[1, 2, 0], torch.nn.functional.cosine_similarity(a[1, 2], b[1, 0], dim=0))
    torch.testing.assert_close(similarity(a, b, "euclidean")[0, 1, 2], -(a[0, 1] - b[0, 2]).norm())
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


def test_attention_foreground_mass() -> None:
    net = _net().eval()
    images = torch.randn(2, 3, 42, 42)
    _, everything = net.encode(images, attention_mask_threshold=1.0)
    _, top = net.encode(images, attention_mask_threshold=1e-6)
    assert everything.shape == (2, 3, 3) and everything.all()
    assert top.flatten(1).sum(1).tolist() == [1, 1]  # only the most attended patch
    x, prefix, _, _ = net._embed(images)
    for block in list(net.backbone.blocks)[:-1]:
        x = block(x)
    mid = attention_foreground(net.backbone.blocks[-1], x, prefix, 0.6)
    assert 0 < int(mid.sum()) < 18


def _loss_inputs(student: NeCoNet, teacher: NeCoNet) -> tuple:
    torch.manual_seed(5)
    globals_, locals_ = torch.randn(4, 3, 42, 42), torch.randn(2, 3, 28, 28)
    s_maps = student(globals_, locals_)
    with torch.no_grad():
        t_maps, fg = teacher.encode(globals_, 0.6)
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).expand(2, 2, 3, 2, 4).clone()
    flips = torch.tensor([[False, True, False], [True, False, False]])
    refs = [torch.randn(2, 8, 32) for _ in range(2)]
    return list(s_maps[0].chunk(2)) + [s_maps[1]], list(t_maps.chunk(2)), boxes, flips, refs, list(fg.chunk(2))


@pytest.mark.parametrize("mask_mode", ["all", "fg", "bg"])
def test_loss_gradients_reach_only_the_student(mask_mode: str) -> None:
    student = _net(1).train()
    teacher = make_teacher(student)
    loss_fn = NeCoLoss(SoftSorter(steepness=100.0), SoftSorter(steepness=100.0), grid_size=3, mask_mode=mask_mode)  # type: ignore[arg-type]
    s_maps, t_maps, boxes, flips, refs, fg = _loss_inputs(student, teacher)
    for r in refs:
        r.requires_grad_(True)
    loss = loss_fn(s_maps, t_maps, boxes, flips, refs, fg)
    assert loss.ndim == 0 and math.isfinite(loss.detach().item()) and loss.detach().item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(r.grad is None for r in refs)  # references are targets, never trained towards
    assert student.head.mlp[0].weight.grad.abs().sum() > 0
    assert student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_loss_is_cross_entropy_of_permutations() -> None:
    """Identical student and teacher: the loss is the entropy of the teacher's permutations,
    computed here independently from the sorter's matrices."""
    sorter = SoftSorter(steepness=10.0)
    loss_fn = NeCoLoss(sorter, sorter, grid_size=2)
    maps = [torch.randn(1, 4, 3, 3) for _ in range(2)]
    boxes = torch.tensor([0.0, 0.0, 42.0, 42.0]).expand(1, 2, 2, 2, 4).clone()
    flips = torch.zeros(1, 2, dtype=torch.bool)
    refs = [torch.randn(1, 4, 4) for _ in range(2)]
    loss = loss_fn(maps, maps, boxes, flips, refs)
    expected = []
    for g, v in ((0, 1), (1, 0)):
        perm = sorter(similarity(roi_grid(maps[g], boxes[:, g, v, 0], flips[:, g], 2), refs[g], "cosine"))[1]
        perm_v = sorter(similarity(roi_grid(maps[v], boxes[:, g, v, 1], flips[:, v], 2), refs[g], "cosine"))[1]
        expected.append(-(perm * perm_v.clamp_min(1e-8).log()).sum(-1).mean())
    torch.testing.assert_close(loss, torch.stack(expected).mean())


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
    batch = torch.full((3, 4, 2), -1.0)
    assert (queue.references(1, batch, 6) == -1).all()  # empty queue: drawn from the batch
    refs = queue.references(0, batch, 6)
    assert refs.shape == (3, 6, 2) and set(refs[..., 0].flatten().tolist()) <= {10.0, 12.0, 4.0, 6.0, 8.0}
    other = ReferenceQueue(2, 5, 2)
    other.load_state_dict(queue.state_dict())
    assert torch.equal(other.buffer, queue.buffer) and other.pointer == queue.pointer and other.count == queue.count
    with pytest.raises(ValueError, match="shape"):
        ReferenceQueue(2, 4, 2).load_state_dict(queue.state_dict())
    queue.push_from(1, torch.randn(3, 4, 2), 2, gather=lambda t: torch.cat([t, t]))
    assert queue.count[1] == 5  # 3 images x 2 patches x 2 "ranks" = 12, capped at the length
