"""The teacher: an exponential moving average of the student, never trained by gradients."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of the student (same weights at step 0, as in the recipe)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


def momentum_at(step: int, total_steps: int, base: float = 0.9995, final: float = 1.0) -> float:
    """Cosine schedule from `base` at step 0 to `final` at `total_steps`."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, for all parameters (frozen ones included,
    so a teacher of a partly frozen student still equals the student where nothing trains).

    Every rank applies the same update to identical DDP-synchronised student weights, so the
    teachers stay identical without any communication.
    """
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        t_buf.copy_(s_buf)
