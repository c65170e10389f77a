"""Multi-crop views with known overlaps: the geometry NeCo's patch matching relies on.

Each image yields 2 global + N local crops. Every compared pair (each global crop against every
other view) is re-sampled until the two crops overlap by at least `min_intersection` of the
image area. For every pair the overlap is returned as a box in each crop's own pixel
coordinates (continuous XYXY, pixel i spans [i, i+1)), after resize and horizontal flip; the
box is carried through torchvision v2's geometric functionals so that resize and flip maths is
torchvision's, not ours. `flips` tells the matcher which crops are mirrored: an ROI grid taken
from a mirrored crop must be mirrored back before cells can be compared. The reference never
mirrors its crops, so `CropSection.flip_p` (the geometry's only source of defaults) is 0.

All randomness comes from a seed passed per sample, so a sample is a pure function of
(image, seed): resuming a run reproduces its data stream exactly, whatever the worker count.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision import tv_tensors

from neco.contract import ModelContract
from neco.training.config import CropSection

Box = tuple[int, int, int, int]
"""Integer crop box in source-image pixels: (left, top, right, bottom), right/bottom exclusive."""


MAX_TRIES = 50
"""Re-draws of a crop before falling back to a construction that satisfies the overlap."""


def _rand(gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def sample_crop(
    gen: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """RandomResizedCrop's box distribution (area fraction in `scale`, log-uniform aspect)."""
    area = height * width
    for _ in range(10):
        target = area * _rand(gen, *scale)
        aspect = math.exp(_rand(gen, math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            return left, top, left + w, top + h
    side = min(height, width)  # same fallback as torchvision: a central square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def intersection(a: Box, b: Box) -> Box | None:
    left, top, right, bottom = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (left, top, right, bottom) if right > left and bottom > top else None


def _area(box: Box | None) -> int:
    return 0 if box is None else (box[2] - box[0]) * (box[3] - box[1])


def sample_layout(gen: torch.Generator, height: int, width: int, spec: CropSection) -> list[Box]:
    """Crop boxes for [global0, global1, local0, ...] such that every compared pair overlaps.

    Globals are re-drawn until they overlap enough; each local until it overlaps both globals.
    If a local keeps failing, it is drawn inside the globals' common area, which satisfies the
    constraint by construction, so sampling always terminates.
    """
    need = spec.min_intersection * height * width
    for _ in range(MAX_TRIES):
        globals_ = [sample_crop(gen, height, width, spec.global_scale, spec.ratio) for _ in range(2)]
        common = intersection(*globals_)
        if _area(common) >= max(need, 1):
            break
    else:
        globals_ = [(0, 0, width, height)] * 2
        common = globals_[0]
    assert common is not None
    boxes = list(globals_)
    for _ in range(spec.num_local):
        for _ in range(MAX_TRIES):
            box = sample_crop(gen, height, width, spec.local_scale, spec.ratio)
            if all(_area(intersection(box, g)) >= max(need, 1) for g in globals_):
                break
        else:
            ch, cw = common[3] - common[1], common[2] - common[0]
            box = sample_crop(
                gen, ch, cw, (min(1.0, spec.local_scale[1] * height * width / (ch * cw)), 1.0), spec.ratio
            )
            box = (box[0] + common[0], box[1] + common[1], box[2] + common[0], box[3] + common[1])
        boxes.append(box)
    return boxes


def box_in_view(region: Box, crop: Box, out_size: int, flipped: bool, canvas: tuple[int, int]) -> Tensor:
    """Where `region` (source pixels) lands in a crop resized to `out_size` and maybe flipped."""
    boxes = tv_tensors.BoundingBoxes(torch.tensor([region], dtype=torch.float32), format="XYXY", canvas_size=canvas)
    left, top, right, bottom = crop
    boxes = F.resized_crop(
        boxes, top=top, left=left, height=bottom - top, width=right - left, size=[out_size, out_size]
    )
    if flipped:
        boxes = F.horizontal_flip(boxes)
    return boxes.as_subclass(Tensor)[0]


def pair_boxes(boxes: list[Box], sizes: list[int], flips: list[bool], canvas: tuple[int, int]) -> Tensor:
    """Overlap boxes for every (global g, view v) pair: [2, V, 2, 4] = (box in g, box in v).

    The diagonal (g == v) is never compared and stays zero.
    """
    out = torch.zeros(2, len(boxes), 2, 4)
    for g in range(2):
        for v in range(len(boxes)):
            if v == g:
                continue
            region = intersection(boxes[g], boxes[v])
            if region is None:
                raise RuntimeError(f"views {g} and {v} do not overlap; layout sampling is broken")
            out[g, v, 0] = box_in_view(region, boxes[g], sizes[g], flips[g], canvas)
            out[g, v, 1] = box_in_view(region, boxes[v], sizes[v], flips[v], canvas)
    return out


class MultiCropViews:
    """Callable turning a uint8 [3, H, W] image into NeCo's views, boxes and flip flags.

    Photometric augmentation follows the DINO/NeCo recipe (colour jitter p=0.8, grayscale
    p=0.2, Gaussian blur p=1.0 / 0.1 on the globals and 0.5 on locals, solarisation p=0.2 on
    the second global), scaled by `jitter_strength` / `blur_strength`. Crops are standardised
    with the mean/std of `contract`, the model being trained (DINOv3's satellite weights use
    other statistics than ImageNet's); `contract=None` leaves them in [0, 1] (geometry tests).
    """

    def __init__(self, spec: CropSection, contract: ModelContract | None) -> None:
        self.spec = spec
        j = spec.jitter_strength
        jitter = T.Compose(
            [
                T.RandomApply([T.ColorJitter(0.4 * j, 0.4 * j, 0.2 * j, min(0.1 * j, 0.5))], p=0.8 if j > 0 else 0.0),
                T.RandomGrayscale(p=0.2 if j > 0 else 0.0),
            ]
        )
        blur_p = (1.0, 0.1, 0.5) if spec.blur_strength > 0 else (0.0, 0.0, 0.0)
        sigma = (0.1, max(0.1, 2.0 * spec.blur_strength))

        def blur(p: float, size: int) -> T.Transform:
            kernel = max(3, int(size * 0.1) // 2 * 2 + 1)
            return T.RandomApply([T.GaussianBlur(kernel, sigma)], p=p)

        finish = [T.ToDtype(torch.float32, scale=True)]
        if contract is not None:
            finish.append(T.Normalize(contract.mean, contract.std))
        self.photometric = [
            T.Compose([jitter, blur(blur_p[0], spec.global_size), *finish]),
            T.Compose(
                [jitter, blur(blur_p[1], spec.global_size), T.RandomSolarize(128, p=0.2 if j > 0 else 0.0), *finish]
            ),
            T.Compose([jitter, blur(blur_p[2], spec.local_size), *finish]),
        ]

    def __call__(self, image: Tensor, seed: int) -> dict[str, Tensor]:
        """Views for one uint8 image; deterministic in `seed` (the global RNG is left untouched)."""
        spec = self.spec
        _, height, width = image.shape
        gen = torch.Generator().manual_seed(seed)
        boxes = sample_layout(gen, height, width, spec)
        sizes = [spec.global_size] * 2 + [spec.local_size] * spec.num_local
        flips = [bool(torch.rand((), generator=gen) < spec.flip_p) for _ in boxes]
        views = []
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms use the global RNG
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
            for i, (box, size, flip) in enumerate(zip(boxes, sizes, flips)):
                left, top, right, bottom = box
                view = F.resized_crop(image, top, left, bottom - top, right - left, [size, size], antialias=True)
                if flip:
                    view = F.horizontal_flip(view)
                views.append(self.photometric[min(i, 2)](view))
        return {
            "global": torch.stack(views[:2]),
            "local": torch.stack(views[2:]) if spec.num_local else torch.zeros(0, 3, spec.local_size, spec.local_size),
            "boxes": pair_boxes(boxes, sizes, flips, (height, width)),
            "flips": torch.tensor(flips),
        }
