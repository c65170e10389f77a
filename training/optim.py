"""AdamW with NeCo's parameter groups and schedules (lr cosine with warm-up, weight decay cosine).

Schedules are pure functions of the optimiser step, so resuming needs only the step count and
the optimiser state; nothing else about them has to be checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from neco.training.config import OptimSection

NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token")
"""Learned tokens and embeddings: decaying them towards zero only hurts (DINO convention)."""


@dataclass(frozen=True)
class Schedule:
    """The optimiser section's hyper-parameters laid out over `total_steps` optimiser steps."""

    total_steps: int
    optim: OptimSection

    def lr_factor(self, step: int) -> float:
        """Linear warm-up to 1, then cosine to `min_lr_ratio` at `total_steps`."""
        warmup, floor = self.optim.warmup_steps, self.optim.min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(self.total_steps - warmup, 1), 1.0)
        return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2

    def weight_decay_at(self, step: int) -> float:
        """Cosine from `weight_decay` to `weight_decay_end`."""
        start, end = self.optim.weight_decay, self.optim.weight_decay_end
        progress = min(step / max(self.total_steps, 1), 1.0)
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def _decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim > 1 and not any(token in name for token in NO_DECAY_NAMES)


def param_groups(backbone: nn.Module, head: nn.Module, schedule: Schedule) -> list[dict]:
    """Four groups: {backbone, head} x {decay, no decay}; frozen parameters are left out."""
    groups = []
    o = schedule.optim
    for part, module, lr in (("backbone", backbone, o.backbone_lr), ("head", head, o.head_lr)):
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
                        "weight_decay": o.weight_decay if decay else 0.0,
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
    return schedule.optim.head_lr * factor
