"""FIFO queues of teacher global-crop patch embeddings, the reference set NeCo sorts against.

One queue per global crop. Every step pushes `per_image` random teacher patches of every image
of the global batch (all ranks' pushes are gathered first, so every rank holds the same queue).
Every (teacher global crop, student view) pair gets its own draw of references; until a queue
is full they are drawn from the current batch's teacher patches instead of the queue.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ReferenceQueue:
    """`num_queues` ring buffers of `length` x `dim` embeddings with checkpointable state."""

    def __init__(self, num_queues: int, length: int, dim: int, device: torch.device | str = "cpu") -> None:
        if length < 1:
            raise ValueError(f"queue length must be >= 1, got {length}")
        self.buffer = torch.zeros(num_queues, length, dim, device=device)
        self.pointer = [0] * num_queues
        self.count = [0] * num_queues

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    def full(self, queue: int) -> bool:
        return self.count[queue] >= self.length

    @torch.no_grad()
    def push(self, queue: int, embeddings: Tensor) -> None:
        """Append [M, dim] embeddings, overwriting the oldest ones (M may exceed the length)."""
        embeddings = embeddings.detach().to(self.buffer.dtype)[-self.length :]
        idx = (self.pointer[queue] + torch.arange(len(embeddings), device=self.buffer.device)) % self.length
        self.buffer[queue, idx] = embeddings.to(self.buffer.device)
        self.pointer[queue] = (self.pointer[queue] + len(embeddings)) % self.length
        self.count[queue] = min(self.length, self.count[queue] + len(embeddings))

    def references(
        self, queue: int, batch_patches: Tensor, per_image: int, draws: int = 1, mask: Tensor | None = None
    ) -> Tensor:
        """`draws` independent reference sets [draws, B, per_image, dim], one per crop pair.

        From the queue once it is full, otherwise from the patches of all of `batch_patches`
        [B, N, dim] (only those where `mask` [B, N] is set, in the fg/bg modes), so an image's
        references mostly come from other images. The reference implementation reads its queue
        from the first step, zero rows included; drawing from the batch until the queue is full
        avoids those zero references (the project's one deliberate difference). Each set is
        drawn without replacement, like the reference's `randperm`, when the pool is large
        enough (global torch RNG, checkpointed).
        """
        batch, dim = batch_patches.shape[0], batch_patches.shape[-1]
        pool = self.buffer[queue] if self.full(queue) else _masked_rows(batch_patches.detach(), mask)
        return _draw(pool, draws, batch * per_image).reshape(draws, batch, per_image, dim).to(batch_patches.dtype)

    @torch.no_grad()
    def push_from(
        self,
        queue: int,
        batch_patches: Tensor,
        per_image: int,
        gather: Callable[[Tensor], Tensor],
        mask: Tensor | None = None,
    ) -> None:
        """Push B x `per_image` random patches of [B, N, dim], gathered over ranks.

        Without a mask, `per_image` of each image; with a [B, N] mask (fg/bg modes), drawn from
        the batch's masked patches, as the reference queues only the patches its loss uses.
        Every rank pushes the same count, which the gather needs.
        """
        batch, num, dim = batch_patches.shape
        if mask is None:
            idx = torch.rand(batch, num, device=batch_patches.device).argsort(-1)[:, :per_image]
            picked = torch.gather(batch_patches.detach(), 1, idx[..., None].expand(-1, -1, dim)).reshape(-1, dim)
        else:
            picked = _draw(_masked_rows(batch_patches.detach(), mask), 1, batch * per_image)[0]
        self.push(queue, gather(picked.float()))

    def state_dict(self) -> dict[str, object]:
        return {"buffer": self.buffer.cpu(), "pointer": list(self.pointer), "count": list(self.count)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        buffer = state["buffer"]
        assert isinstance(buffer, Tensor)
        if buffer.shape != self.buffer.shape:
            raise ValueError(f"queue state has shape {tuple(buffer.shape)}, expected {tuple(self.buffer.shape)}")
        self.buffer.copy_(buffer)
        self.pointer = [int(p) for p in state["pointer"]]  # type: ignore[union-attr]
        self.count = [int(c) for c in state["count"]]  # type: ignore[union-attr]


def _masked_rows(patches: Tensor, mask: Tensor | None) -> Tensor:
    """[B, N, dim] -> [M, dim]: the rows where `mask` [B, N] is set (all rows if none is)."""
    rows = patches.reshape(-1, patches.shape[-1])
    if mask is None:
        return rows
    keep = mask.reshape(-1).bool()
    return rows[keep] if bool(keep.any()) else rows


def _draw(pool: Tensor, draws: int, needed: int) -> Tensor:
    """[draws, needed, dim] rows of `pool`: without replacement where it holds enough rows."""
    if len(pool) >= needed:
        idx = torch.rand(draws, len(pool), device=pool.device).argsort(-1)[:, :needed]
    else:
        idx = torch.randint(0, len(pool), (draws, needed), device=pool.device)
    return pool[idx]
