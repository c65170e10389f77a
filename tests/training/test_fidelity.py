"""The training loss and its student gradients equal the reference method, computed independently here.

The independent computation below is written from the published description of the reference
implementation (the facts, not the project's code): `torchvision.ops.roi_align(maps, [boxes / patch],
7, aligned=True)` (patch 14 for DINOv2 as published, 16 for DINOv3), grids of mirrored crops mirrored back, cosine similarity or `+cdist` distances
to one fresh reference set per (teacher global crop, student view) pair, `diffsort.DiffSortNet`
(the reference's sorter) on every cell's row, -sum q log p over the permutation's last axis, the
fg/bg mask from the class-token attention (blur 7 / 0.6, top 60% of the mass, components of <= 2
patches removed, inverted before alignment for 'bg', aligned value >= 1.0), and per global crop
the sum over its pairs / (views - 1), averaged over global crops. None of the project's
functions is used on this side.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch
import torch.nn.functional as F
import torchvision
from diffsort import DiffSortNet
from torchvision.ops import roi_align

from neco.training.method import NeCoLoss, crop_pairs
from neco.training.sorting import SoftSorter
from tests.training.tiny import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = 7
REFS = 16
STEEPNESS = 100.0
CELLS = {14: (16, 7), 16: (14, 7)}
"""Patch size -> (global, local) crop sides in patches: the recipes' 224/98 px at 14 and 224/112 px at 16."""
BATCH, DIM, GLOBALS, LOCALS = 2, 16, 2, 2
FEATURE_SCALE = DIM**-0.5  # patch embeddings of about unit norm
TEACHER_OFFSET = 0.1
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
CONNECTIVITY = 8


def _components(mask: list[list[bool]], connectivity: int) -> list[list[tuple[int, int]]]:
    """Connected components of a binary grid by breadth-first search (the test's own labelling)."""
    h, w = len(mask), len(mask[0])
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    seen, found = set(), []
    for y in range(h):
        for x in range(w):
            if not mask[y][x] or (y, x) in seen:
                continue
            queue, component = deque([(y, x)]), []
            seen.add((y, x))
            while queue:
                cy, cx = queue.popleft()
                component.append((cy, cx))
                for dy, dx in steps:
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny][nx] and (ny, nx) not in seen:
                        seen.add((ny, nx))
                        queue.append((ny, nx))
            found.append(component)
    return found


def reference_mask(attention: torch.Tensor, threshold: float, connectivity: int) -> torch.Tensor:
    """[h, w] attention -> 0/1 float mask, step by step as the reference describes it."""
    blurred = torchvision.transforms.GaussianBlur(7, sigma=0.6)(attention[None, None])[0, 0]
    values, order = torch.sort(blurred.flatten())
    keep_sorted = torch.cumsum(values / values.sum(), 0) > 1 - threshold
    keep = keep_sorted[torch.argsort(order)].reshape(blurred.shape)
    grid = keep.tolist()
    for component in _components(grid, connectivity):
        if len(component) <= 2:
            for y, x in component:
                keep[y, x] = False
    return keep.to(attention.dtype)


def reference_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    boxes: torch.Tensor,
    flips: torch.Tensor,
    references: dict[tuple[int, int], torch.Tensor],
    kind: str,
    mask_mode: str,
    attention: list[torch.Tensor],
    connectivity: int,
    patch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The NeCo loss and the cells the mask keeps (bool, every pair's in turn; empty for 'all'),
    from the reference's description."""
    num_refs = next(iter(references.values())).shape[1]
    sorter = DiffSortNet("bitonic", num_refs, steepness=STEEPNESS)

    def align(maps: torch.Tensor, pixel_boxes: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        grid = roi_align(maps, [b[None] for b in pixel_boxes / patch], GRID, aligned=True)  # [B, C, 7, 7]
        return torch.stack([g.flip(-1) if f else g for g, f in zip(grid, flipped)])

    def permutations(grid: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        cells = grid.flatten(2).transpose(1, 2)  # [B, 49, D]
        if kind == "cosine":
            scores = torch.einsum("bpd,brd->bpr", F.normalize(cells, dim=-1), F.normalize(refs, dim=-1))
        else:  # distances, sorted as they are, with the reference's call (matrix-product path, > 25 rows)
            scores = torch.cdist(cells, refs, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary")
        return sorter(scores.reshape(-1, num_refs))[1].reshape(BATCH, GRID * GRID, num_refs, num_refs)

    views, dtype = len(student), student[0].dtype
    total, selected = torch.zeros((), dtype=dtype), []
    for g in range(len(teacher)):
        hard = None
        if mask_mode != "all":
            hard = torch.stack([reference_mask(a, 0.6, connectivity) for a in attention[g]])
            if mask_mode == "bg":
                hard = (hard - 1).abs()
        sub = torch.zeros((), dtype=dtype)
        for v in range(views):
            if v == g:
                continue
            refs = references[(g, v)]
            q = permutations(align(teacher[g], boxes[:, g, v, 0], flips[:, g]), refs).detach()
            p = permutations(align(student[v], boxes[:, g, v, 1], flips[:, v]), refs)
            ce = (q * torch.log(p)).sum(-1)  # [B, 49 cells, 49 positions]; the reference takes log p unclamped
            if hard is None:
                sub = sub - ce.mean()
                continue
            aligned = align(hard[:, None], boxes[:, g, v, 0], flips[:, g]).flatten(1)  # [B, 49]
            mask = (aligned >= 1.0).float()[:, :, None].expand_as(ce)
            selected.append(mask[..., 0].flatten().bool())
            if mask.sum() > 0:
                sub = sub - (ce * mask).sum() / mask.sum()
        total = total + sub / (views - 1)
    return total / len(teacher), torch.cat(selected) if selected else torch.zeros(0, dtype=torch.bool)


def _box(gen: torch.Generator, size: float, full: bool) -> torch.Tensor:
    if full:
        return torch.tensor([0.0, 0.0, size, size])
    low = torch.rand(2, generator=gen) * size * 0.5
    high = low + (0.3 + 0.7 * torch.rand(2, generator=gen)) * (size - low)
    return torch.stack([low[0], low[1], high[0], high[1]])


def _inputs(flip: bool, dtype: torch.dtype, patch: int, refs: int = REFS, scale: float = FEATURE_SCALE) -> dict:
    gen = torch.Generator().manual_seed(11)
    views = GLOBALS + LOCALS
    side, local_side = CELLS[patch]
    cells = [side] * GLOBALS + [local_side] * LOCALS
    student = [(scale * torch.randn(BATCH, DIM, c, c, generator=gen)).requires_grad_() for c in cells]
    # The teacher is an EMA of the student: close to it, so q/p stays moderate as in training (a
    # random, unrelated teacher puts weight on p ~ 1e-6 entries whose fp32 rounding dominates).
    teacher = [s.detach() + scale * TEACHER_OFFSET * torch.randn(s.shape, generator=gen) for s in student[:GLOBALS]]
    boxes = torch.zeros(BATCH, GLOBALS, views, 2, 4)
    for b in range(BATCH):
        for g, v in crop_pairs(GLOBALS, views):
            boxes[b, g, v, 0] = _box(gen, cells[g] * patch, full=False)
            boxes[b, g, v, 1] = _box(gen, cells[v] * patch, full=v == views - 1)  # one whole local crop
    flips = torch.rand(BATCH, views, generator=gen) < 0.5 if flip else torch.zeros(BATCH, views, dtype=torch.bool)
    if flip:
        assert flips.any() and not flips.all()
    ys, xs = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    attention = []
    for _ in range(GLOBALS):  # an attended blob, an isolated speck and noise
        centre = torch.rand(BATCH, 2, generator=gen) * side / 2 + side / 4
        blob = torch.exp(-((ys - centre[:, :1, None]) ** 2 + (xs - centre[:, 1:, None]) ** 2) / 30)
        noise = 0.02 * torch.rand(BATCH, side, side, generator=gen)
        speck = torch.zeros(BATCH, side, side)
        speck[:, 0, side - 1] = 0.6
        attention.append((blob + noise + speck) / 20)
    references = scale * torch.randn(len(crop_pairs(GLOBALS, views)), BATCH, refs, DIM, generator=gen)
    return {
        "student": [s.detach().to(dtype).requires_grad_() for s in student],
        "teacher": [t.to(dtype) for t in teacher],
        "boxes": boxes.to(dtype),
        "flips": flips,
        "refs": references.to(dtype),
        "attn": [a.to(dtype) for a in attention],
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _losses_and_gradients(
    kind: str,
    mask_mode: str,
    flip: bool,
    dtype: torch.dtype,
    patch: int = 14,
    refs: int = REFS,
    scale: float = FEATURE_SCALE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(our loss, our student gradients, reference loss, reference gradients, the reference's masked cells)."""
    data = _inputs(flip, dtype, patch, refs, scale)
    pairs = crop_pairs(GLOBALS, GLOBALS + LOCALS)
    loss_fn = NeCoLoss(
        SoftSorter("bitonic", steepness=STEEPNESS),
        SoftSorter("bitonic", steepness=STEEPNESS),
        patch_size=patch,
        similarity=kind,  # type: ignore[arg-type]
        grid_size=GRID,
        mask_mode=mask_mode,  # type: ignore[arg-type]
        mask_threshold=0.6,
        mask_connectivity=CONNECTIVITY,
    )
    masks = loss_fn.patch_masks(data["attn"])
    ours = loss_fn(data["student"], data["teacher"], data["boxes"], data["flips"], data["refs"], masks)
    our_grads = torch.autograd.grad(ours, data["student"])
    assert sum(int(g.abs().sum() > 0) for g in our_grads) >= len(our_grads) - (mask_mode != "all")
    refs = {pair: data["refs"][i] for i, pair in enumerate(pairs)}
    theirs, selected = reference_loss(
        data["student"],
        data["teacher"],
        data["boxes"],
        data["flips"],
        refs,
        kind,
        mask_mode,
        data["attn"],
        CONNECTIVITY,
        patch,
    )
    # A pair without masked cells contributes a constant 0 there, so a view may get no gradient.
    their_grads = [
        torch.zeros_like(s) if g is None else g
        for g, s in zip(torch.autograd.grad(theirs, data["student"], allow_unused=True), data["student"])
    ]
    flat = [torch.cat([g.flatten() for g in grads]).double() for grads in (our_grads, their_grads)]
    return ours.detach().double(), flat[0], theirs.detach().double(), flat[1], selected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("flip", [False, True], ids=["no_flips", "flips"])
@pytest.mark.parametrize("mask_mode", ["all", "fg", "bg"])
@pytest.mark.parametrize("kind", ["cosine", "euclidean"])
@pytest.mark.parametrize("patch", [14, 16], ids=["patch14", "patch16"])
def test_loss_and_student_gradients_equal_the_reference(
    patch: int, kind: str, mask_mode: str, flip: bool, dtype: torch.dtype
) -> None:
    """At DINOv2's patch 14 and DINOv3's patch 16 (boxes divided by each). float64: the same
    mathematics to rounding (1e-10); float32: loss to 1e-5, gradients to 1e-5 or, if larger,
    the reference's own float32 rounding error.

    That floor is measured on the same batch in mask mode 'all', and in the test's mask mode
    when float32 and float64 keep the same cells (the masks' `>= 1.0` test can select other
    cells in float32 than in float64, which is not rounding noise): both computations sit
    about 1e-5 from the float64 value, because a score's rounding, times the sorter's
    steepness of 100, moves the comparators (5e-5 for euclidean distances of ~5; the features
    here have about unit norm, which keeps distances near 1). A mask averages fewer cells, so
    its relative rounding error is larger (up to 1.8e-5 for the reference at patch 16).
    """
    ours, our_grads, theirs, their_grads, selected = _losses_and_gradients(kind, mask_mode, flip, dtype, patch)
    if mask_mode != "all":
        assert 0 < selected.float().mean() < 1  # the mask really selects some cells, not all
    loss_diff = float((ours - theirs).abs() / theirs.abs())
    grad_diff = _relative(our_grads, their_grads)
    grad_tolerance = TOLERANCE[dtype]
    if dtype == torch.float32:
        _, _, _, rounded, _ = _losses_and_gradients(kind, "all", flip, torch.float32, patch)
        _, _, _, exact, _ = _losses_and_gradients(kind, "all", flip, torch.float64, patch)
        grad_tolerance = max(grad_tolerance, _relative(rounded, exact))
        if mask_mode != "all":
            _, _, _, exact_masked, selected_exactly = _losses_and_gradients(kind, mask_mode, flip, torch.float64, patch)
            if torch.equal(selected, selected_exactly):  # the same cells: what is left is rounding
                grad_tolerance = max(grad_tolerance, _relative(their_grads, exact_masked))
    print(
        f"patch {patch}/{kind}/{mask_mode}/{'flips' if flip else 'no flips'}/{dtype}: loss {loss_diff:.2e} grad {grad_diff:.2e}",
        end=" ",
    )
    print(f"(tolerance {grad_tolerance:.2e})")
    assert loss_diff <= TOLERANCE[dtype], loss_diff
    assert grad_diff <= grad_tolerance, (grad_diff, grad_tolerance)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_euclidean_log_is_not_floored(scale: float) -> None:
    """The recipe's 49 references and euclidean distances of several units put soft-permutation
    entries below 1e-8 (here down to ~1e-14); the reference takes log p there as it is. The former
    1e-8 floor moved the loss by 1e-7 - 1e-4 and the gradients by 2e-4 - 5e-3 (float64, this batch)."""
    ours, our_grads, theirs, their_grads, _ = _losses_and_gradients(
        "euclidean", "all", False, torch.float64, refs=49, scale=scale
    )
    assert float((ours - theirs).abs() / theirs.abs()) <= TOLERANCE[torch.float64]
    assert _relative(our_grads, their_grads) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_foreground_masks_equal_the_reference(connectivity: int) -> None:
    from neco.training.method import foreground_mask  # the unit under test, next to its reference

    gen = torch.Generator().manual_seed(3)
    attention = torch.rand(6, 16, 16, generator=gen) ** 4  # peaky: several blobs and specks
    ours = foreground_mask(attention, 0.6, connectivity)  # type: ignore[arg-type]
    theirs = torch.stack([reference_mask(a, 0.6, connectivity) for a in attention])
    assert torch.equal(ours, theirs)
    assert 0 < ours.mean() < 1
