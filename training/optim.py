"""AdamW with NeCo's parameter groups and schedules (lr cosine with warm-up, weight decay cosine).

Schedules are pure functions of the optimiser step, so resuming needs only the step count and
the optimiser state; nothing else about them has to be checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token")
"""Learned tokens and embeddings: decaying them towards zero only hurts (DINO convention)."""


@dataclass(frozen=True)
class Schedule:
    """Optimiser hyper-parameters over `total_steps` optimiser steps."""

    total_steps: int
    backbone_lr: float = 1e-5
    head_lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.5

    def lr_factor(self, step: int) -> float:
        """Linear warm-up to 1, then cosine to `min_lr_ratio` at `total_steps`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2

    def weight_decay_at(self, step: int) -> float:
        """Cosine from `weight_decay` to `weight_decay_end`."""
        progress = min(step / max(self.total_steps, 1), 1.0)
        return (
            self.weight_decay_end + (self.weight_decay - self.weight_decay_end) * (1 + math.cos(math.pi * progress)) / 2
        )


def _decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim > 1 and not any(token in name for token in NO_DECAY_NAMES)


def param_groups(backbone: nn.Module, head: nn.Module, schedule: Schedule) -> list[dict]:
    """Four groups: {backbone, head} x {decay, no decay}; frozen parameters are left out."""
    groups = []
    for part, module, lr in (("backbone", backbone, schedule.backbone_lr), ("head", head, schedule.head_lr)):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for decay in (True, False):
            params = [p for n, p in named if _decays(n, p) == decay]
            if params:
                groups.append(
                    {
                        "name": f"{part}{'' if decay else '_no_decay'}",
                        "params": params,
                        "base_lr": lr,
                        "lr": lr,
                        "apply_decay": decay,
                        "weight_decay": schedule.weight_decay if decay else 0.0,
                    }
                )
    if not groups:
        raise ValueError("no trainable parameters: the backbone and head are entirely frozen")
    return groups


def build_optimizer(backbone: nn.Module, head: nn.Module, schedule: Schedule, fused: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(backbone, head, schedule), betas=(0.9, 0.999), fused=fused or None)


def apply_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr and weight decay for optimiser step `step`; returns the head lr."""
    factor, decay = schedule.lr_factor(step), schedule.weight_decay_at(step)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
        group["weight_decay"] = decay if group["apply_decay"] else 0.0
    return schedule.head_lr * factor
