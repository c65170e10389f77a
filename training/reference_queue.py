"""FIFO queues of teacher global-crop patch embeddings, the reference set NeCo sorts against.

One queue per global crop. Every step pushes `per_image` random teacher patches of every image
of the global batch (all ranks' pushes are gathered first, so every rank holds the same queue).
Until a queue is full, references are a shuffled draw of patches from the current batch.
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

    def references(self, queue: int, batch_patches: Tensor, per_image: int) -> Tensor:
        """[B, per_image, dim] references for each image: from the queue once it is full,
        otherwise drawn at random (global torch RNG, checkpointed) from all of `batch_patches`
        [B, N, dim], so an image's references mostly come from other images."""
        batch = batch_patches.shape[0]
        if self.full(queue):
            idx = torch.randint(0, self.length, (batch, per_image), device=self.buffer.device)
            return self.buffer[queue][idx].to(batch_patches.dtype)
        pool = batch_patches.detach().reshape(-1, batch_patches.shape[-1])
        idx = torch.randint(0, len(pool), (batch, per_image), device=pool.device)
        return pool[idx]

    @torch.no_grad()
    def push_from(self, queue: int, batch_patches: Tensor, per_image: int, gather: Callable[[Tensor], Tensor]) -> None:
        """Push `per_image` random patches of each image in [B, N, dim], gathered over ranks."""
        batch, num, _ = batch_patches.shape
        idx = torch.rand(batch, num, device=batch_patches.device).argsort(-1)[:, :per_image]
        picked = torch.gather(batch_patches.detach(), 1, idx[..., None].expand(-1, -1, batch_patches.shape[-1]))
        self.push(queue, gather(picked.reshape(-1, picked.shape[-1]).float()))

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
