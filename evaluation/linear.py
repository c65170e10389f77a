"""Linear-probe evaluation: a linear head on frozen dense features, scored by mIoU.

The frozen "backbone" is any `FeatureBackend` (torch by default, but the served or exported
model works too), so the probe measures exactly the features applications receive. Features
are extracted once per image at the client's resize policy and cached; only the 1x1 linear
head trains. Its logits (patch grid) are upsampled bilinearly to each mask's full size before
the cross-entropy (ignore 255) and the argmax, as in the linear-segmentation protocol.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from neco.client.images import SizeSpec
from neco.contract import IGNORE_INDEX
from neco.evaluation.backends import iter_features
from neco.evaluation.config import EvalConfig
from neco.evaluation.datasets import SegmentationDataset, load_dataset
from neco.evaluation.metrics import ConfusionAccumulator, IoUResult

if TYPE_CHECKING:
    import torch

    from neco.client import FeatureBackend


class LinearConfig(EvalConfig):
    """Settings of `neco eval linear` (also loadable from configs/eval_linear.yaml)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1, description="images per head optimisation step")
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    device: str = Field("auto", description="where the head trains: auto | cpu | cuda")


def extract_features(
    backend: FeatureBackend, dataset: SegmentationDataset, size: SizeSpec, desc: str, batch_size: int = 8
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fp16 patch features [h, w, C], full-size mask) per sample, cached for all epochs."""
    return [
        (feats.astype(np.float16), mask)
        for feats, mask in iter_features(backend, dataset, size, batch_size=batch_size, desc=desc)
    ]


def _logits(head: torch.nn.Module, feats: np.ndarray, size: tuple[int, int], device: str) -> torch.Tensor:
    """Head on a [h, w, C] grid -> class logits [1, K, H, W] bilinearly upsampled to `size`."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(feats).to(device).float().permute(2, 0, 1).unsqueeze(0)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        logits = head(x)
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def train_head(
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    cfg: LinearConfig,
    device: str,
) -> torch.nn.Module:
    """AdamW on BatchNorm + 1x1 conv (= per-patch linear layer), cosine schedule, CE ignore 255.

    The (affine-free) BatchNorm only standardises the frozen features, which are unit-norm and
    thus tiny per channel; without it the head's useful learning rate depends on the width.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    dim = train[0][0].shape[-1]
    head = torch.nn.Sequential(
        torch.nn.BatchNorm2d(dim, affine=False), torch.nn.Conv2d(dim, num_classes, kernel_size=1)
    ).to(device)
    optimiser = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=cfg.epochs * steps_per_epoch)
    rng = np.random.default_rng(cfg.seed)
    head.train()
    for _ in tqdm(range(cfg.epochs), desc="linear head", unit="epoch"):
        order = rng.permutation(len(train))
        for start in range(0, len(order), cfg.batch_size):
            optimiser.zero_grad(set_to_none=True)
            batch = order[start : start + cfg.batch_size]
            # Images differ in size, so the loss is summed per image and averaged per pixel.
            total, pixels = 0.0, 0
            for index in batch:
                feats, mask = train[index]
                target = torch.from_numpy(mask.astype(np.int64)).to(device).unsqueeze(0)
                logits = _logits(head, feats, mask.shape, device)
                total = total + F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
                pixels += int((target != IGNORE_INDEX).sum())
            if pixels:
                (total / pixels).backward()
                optimiser.step()
            schedule.step()
    return head.eval()


def evaluate_head(
    head: torch.nn.Module, val: Sequence[tuple[np.ndarray, np.ndarray]], class_names: list[str], device: str
) -> IoUResult:
    import torch

    acc = ConfusionAccumulator(class_names)
    with torch.inference_mode():
        for feats, mask in val:
            prediction = _logits(head, feats, mask.shape, device).argmax(1)[0].cpu().numpy()
            acc.update(prediction, mask)
    return acc.result()


def run_linear(cfg: LinearConfig, backend: FeatureBackend) -> dict[str, object]:
    """Extract features, train the head, score val; returns (and optionally writes) a JSON report."""
    started = time.perf_counter()
    from neco.model import resolve_device

    device = str(resolve_device(cfg.device))
    train_set = load_dataset(cfg.dataset, cfg.data_root, cfg.train_split, subset=cfg.train_subset, seed=cfg.seed)
    val_set = load_dataset(cfg.dataset, cfg.data_root, cfg.val_split)
    cfg.fit_to(backend.contract)
    train = extract_features(backend, train_set, cfg.size, f"features {train_set.split}", cfg.backend.batch_size)
    val = extract_features(backend, val_set, cfg.size, f"features {val_set.split}", cfg.backend.batch_size)
    head = train_head(train, len(train_set.class_names), cfg, device)
    result = evaluate_head(head, val, val_set.class_names, device)
    report: dict[str, object] = {
        **cfg.report_header("linear", train_set, val_set, backend.contract),
        "protocol": "linear",
        "device": device,
        **result.to_dict(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    cfg.write_report(report)
    print(f"linear: input {cfg.size_text} px")
    print(result.table())
    return report
