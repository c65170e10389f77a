"""Shared helpers for training tests: a 2-block ViT-S and a tiny, fast training config.

The mechanics under test (views, queue, EMA, resume, DDP) do not depend on depth, so the
tests swap `create_backbone` for a 2-block timm ViT-S of the configured architecture (DINOv2
`VisionTransformer` or DINOv3 `Eva`) to fit the CPU time budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from neco.training.config import TrainConfig


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small CPU models: thread hand-offs cost more than they parallelise on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_backbone(arch: str, *, pretrained: bool = False, drop_path_rate: float = 0.0) -> Any:
    assert not pretrained
    return timm.create_model(
        arch,
        pretrained=False,
        dynamic_img_size=True,
        num_classes=0,
        drop_path_rate=drop_path_rate,
        depth=2,
        img_size=56,
    )


def use_tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("neco.training.trainer.create_backbone", tiny_backbone)


def tiny_config(output_dir: Path, **sections: dict[str, Any]) -> TrainConfig:
    """Generated scenes at 56 px, 28/14-px... crops: 42/28 px, 2 locals, batch 2, fp32, CPU."""
    data: dict[str, Any] = {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"drop_path_rate": 0.1, "head_hidden_dim": 64, "head_out_dim": 32},
        "data": {"kind": "scenes", "scenes_count": 8, "scenes_size": 64, "num_workers": 0},
        "crops": {"global_size": 42, "local_size": 28, "num_local": 2},
        "method": {"grid_size": 3, "num_references": 8, "queue_length": 16, "queue_push_per_image": 2},
        "optim": {"batch_size": 2, "steps": 4, "warmup_steps": 1},
        "runtime": {
            "device": "cpu",
            "precision": "fp32",
            "checkpoint_every": 2,
            "progress": False,
            "tensorboard": False,
            "channels_last": False,
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return TrainConfig.model_validate(data)
