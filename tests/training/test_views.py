"""Crop geometry: overlaps, boxes after resize/flip, and aligned patches seeing the same place.

The test image encodes each pixel's own (x, y) in its channels, so whatever a crop shows can be
traced back to the source coordinates it came from, independently of the box maths under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neco.contract import DEFAULT_ARCH, ModelContract
from neco.training.config import CropSection, TrainConfig
from neco.training.method import roi_grid
from neco.training.views import MultiCropViews, box_in_view, intersection, sample_layout

H, W = 180, 240


def coordinate_image() -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)


SIZES = {14: (112, 56), 16: (128, 64)}
"""Patch size -> (global, local) crop sides: 8 x 4 patches of DINOv2, 8 x 4 patches of DINOv3."""


def _spec(patch: int) -> CropSection:
    global_size, local_size = SIZES[patch]
    return CropSection(
        global_size=global_size, local_size=local_size, num_local=3, flip_p=0.5, jitter_strength=0.0, blur_strength=0.0
    )


def test_layout_overlaps_every_compared_pair() -> None:
    gen = torch.Generator().manual_seed(0)
    spec = CropSection(global_size=112, local_size=56, num_local=6, min_intersection=0.05)
    for _ in range(200):
        boxes = sample_layout(gen, H, W, spec)
        assert len(boxes) == 8
        for g in range(2):
            for v, box in enumerate(boxes):
                if v != g:
                    region = intersection(boxes[g], box)
                    assert region is not None
                    assert (region[2] - region[0]) * (region[3] - region[1]) >= 0.05 * H * W


def test_box_in_view_matches_hand_computation() -> None:
    crop, region = (40, 30, 140, 110), (60, 50, 100, 90)
    plain = box_in_view(region, crop, 50, False, (H, W))
    sx, sy = 50 / 100, 50 / 80
    expect = torch.tensor([(60 - 40) * sx, (50 - 30) * sy, (100 - 40) * sx, (90 - 30) * sy])
    torch.testing.assert_close(plain, expect)
    flipped = box_in_view(region, crop, 50, True, (H, W))
    torch.testing.assert_close(flipped, torch.tensor([50 - expect[2], expect[1], 50 - expect[0], expect[3]]))


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("seed", range(6))
def test_aligned_grids_look_at_the_same_source_pixels(seed: int, patch: int) -> None:
    views = MultiCropViews(_spec(patch), None)
    out = views(coordinate_image(), seed=seed)
    crops = list(out["global"]) + list(out["local"])
    assert out["boxes"].shape == (2, 5, 2, 4)
    for g in range(2):
        for v in range(5):
            if v == g:
                continue
            grids = []
            for view, box, flip in (
                (g, out["boxes"][g, v, 0], out["flips"][g]),
                (v, out["boxes"][g, v, 1], out["flips"][v]),
            ):
                image = crops[view][None] * 255.0  # coordinates back in source pixels
                pixel = roi_grid(image, box[None], flip[None], 7, patch_size=1)[0, :, :2]
                patches = F.avg_pool2d(image, patch)
                grids.append((pixel, roi_grid(patches, box[None], flip[None], 7, patch_size=patch)[0, :, :2]))
            (pixel_t, patch_t), (pixel_s, patch_s) = grids
            # Pixel level: only resampling blur separates the two (source px per crop px < 4).
            assert (pixel_t - pixel_s).abs().max() < 4.0, (g, v)
            # Patch level: a sample point may be clamped to within half a patch of the border.
            # Source px per crop px is at most ~2.2 for these crop scales on a 180x240 image.
            assert (patch_t - patch_s).abs().max() < 0.5 * patch * 2.2 + 4.0, (g, v)
            # A missed flip or box would be off by a large part of the overlap: check spread.
            assert pixel_t[:, 0].max() - pixel_t[:, 0].min() > 4.0


def _interior_cells(box: torch.Tensor, size: int, flipped: bool, patch: int, grid: int = 7) -> torch.Tensor:
    """[grid*grid] cells whose ROI bin keeps half a patch from the crop's border (no clamped samples)."""
    x0, y0, x1, y1 = box.tolist()
    edges = torch.arange(grid + 1) / grid
    ex, ey = x0 + (x1 - x0) * edges, y0 + (y1 - y0) * edges
    half = patch / 2
    ok_x, ok_y = (ex[:-1] >= half) & (ex[1:] <= size - half), (ey[:-1] >= half) & (ey[1:] <= size - half)
    cells = ok_y[:, None] & ok_x[None, :]
    return (cells.flip(-1) if flipped else cells).flatten()


@pytest.mark.parametrize("patch", [14, 16])
def test_patch_cells_of_both_crops_see_the_same_source_coordinates(patch: int) -> None:
    """Patch maps that hold each patch's mean source (x, y): away from crop borders, bilinear
    ROI cells of teacher and student agree to a fraction of a pixel, flips included, when the
    boxes are divided by the patch size the maps were pooled with."""
    spec = _spec(patch)
    views = MultiCropViews(spec, None)
    sizes = [spec.global_size] * 2 + [spec.local_size] * spec.num_local
    worst, interior, cells, flipped = 0.0, 0, 0, 0
    for seed in range(6):
        out = views(coordinate_image(), seed=seed)
        flipped += int(out["flips"].sum())
        crops = list(out["global"]) + list(out["local"])
        for g in range(2):
            for v in range(len(crops)):
                if v == g:
                    continue
                grids, masks = [], []
                for view, box, flip in (
                    (g, out["boxes"][g, v, 0], out["flips"][g]),
                    (v, out["boxes"][g, v, 1], out["flips"][v]),
                ):
                    patches = F.avg_pool2d(crops[view][None] * 255.0, patch)  # [1, 3, h, w] coordinates
                    grids.append(roi_grid(patches, box[None], flip[None], 7, patch_size=patch)[0, :, :2])
                    masks.append(_interior_cells(box, sizes[view], bool(flip), patch))
                both = masks[0] & masks[1]
                interior, cells = interior + int(both.sum()), cells + both.numel()
                if both.any():
                    worst = max(worst, float((grids[0] - grids[1])[both].abs().max()))
    assert flipped > 0 and interior > 0.2 * cells
    assert worst < 0.5  # source pixels


def test_views_are_deterministic_per_seed_and_do_not_touch_global_rng() -> None:
    views = MultiCropViews(
        CropSection(global_size=56, local_size=28, num_local=2), ModelContract.for_arch(DEFAULT_ARCH)
    )
    image = coordinate_image()
    state = torch.get_rng_state()
    a, b, c = views(image, 5), views(image, 5), views(image, 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global"], c["global"])
    assert a["global"].dtype == torch.float32 and a["local"].shape == (2, 3, 28, 28)


def test_invalid_specs() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        TrainConfig(crops=CropSection(global_size=100))
    with pytest.raises(ValueError, match="smaller than one 14-px patch"):
        TrainConfig(crops=CropSection(local_size=7))
    with pytest.raises(ValueError, match="local_scale"):
        CropSection(local_scale=(0.3, 0.2))


def test_views_are_standardised_with_the_contracts_statistics() -> None:
    """The model's mean/std (here DINOv3's satellite statistics), not a module constant."""
    spec = CropSection(global_size=64, local_size=32, num_local=1, jitter_strength=0.0, blur_strength=0.0)
    contract = ModelContract.for_arch("vit_large_patch16_dinov3.sat493m")
    raw, standardised = (
        MultiCropViews(spec, None)(coordinate_image(), 3),
        MultiCropViews(spec, contract)(coordinate_image(), 3),
    )
    mean, std = torch.tensor(contract.mean)[:, None, None], torch.tensor(contract.std)[:, None, None]
    assert contract.mean != ModelContract.for_arch(DEFAULT_ARCH).mean
    for key in ("global", "local"):
        torch.testing.assert_close(standardised[key], (raw[key] - mean) / std)
