"""Pair-mixing kernel that builds the soft permutation matrix of a sorting network.

Every comparator of a differentiable sorting network replaces the rows ``a`` and ``b`` of the
(transposed) permutation matrix by a convex mix of the two::

    Y'_a = Y_a - q * (Y_a - Y_b)        Y'_b = Y_b + q * (Y_a - Y_b)

where ``q`` is the weight the comparator gives to the *other* wire. A layer therefore costs
O(n) per comparator, O(n^2) per row, instead of the dense O(n^3) matrix products of
``diffsort``. Both networks used here (bitonic and odd-even transposition) pair wires in a
regular pattern ``wires[start : start + groups*2*m]`` viewed as ``[groups, 2, m]`` (partner at
distance ``m``), so each layer is two in-place tensor ops on strided views: no gather/scatter.
In the bitonic network each merge stage stays inside its group of ``2**(stage+1)`` wires, so
until the last stage the matrix is block-diagonal; those layers touch only the diagonal
tiles (about 40% less work at n = 49).

The backward pass needs, for each layer, the difference ``D = Y_a - Y_b`` of that layer's
*input*. Instead of storing it for the whole batch (what autograd would do: O(layers * n^2)
memory per row), the backward recomputes the forward for a chunk of rows at a time, keeps that
chunk's differences in a small buffer, and sweeps the layers in reverse. Peak extra memory is
one chunk's buffer; on CPU the chunk is sized to stay cache-resident, which is also what makes
the element-wise ops fast. The same torch ops run on every device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Bytes one chunk's buffers may take. CPU: the batch row is the innermost axis, so the chunk
# is also the vector length of every element-wise op; ~128-256 rows measured best at n = 49
# (shorter vectors pay per-op overhead, longer ones fall out of cache), hence the row cap.
# CUDA: big enough to fill the device, small against a NeCo step's activations.
_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
_CPU_MAX_CHUNK_ROWS = 256


def _chunk_rows(rows: int, per_row_bytes: int, device: torch.device, chunk_rows: int | None) -> int:
    """Rows per chunk: explicit, or from the per-device byte budget (at least one row)."""
    if chunk_rows is not None:
        return max(1, min(rows, chunk_rows))
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cuda"])
    step = budget // max(per_row_bytes, 1)
    if device.type == "cpu":
        step = min(step, _CPU_MAX_CHUNK_ROWS)
    return max(1, min(rows, step))


class LayerView(NamedTuple):
    """Comparators of one layer: ``wires[start:start + groups*2*m]`` viewed ``[groups, 2, m]``.

    ``block``: before this layer the permutation is block-diagonal with blocks of ``block``
    wires x ``block`` inputs (bitonic: each merge stage stays inside its group), so the
    layer only touches those diagonal blocks. ``0`` means one block over all real inputs.
    """

    start: int
    groups: int
    m: int
    block: int = 0


class _Workspace:
    """Chunk-sized buffers plus every per-layer view of them, built once per call.

    Layout ``[wire, input, row]`` with inputs padded like the wires: the batch row is the
    innermost, contiguous axis, so the element-wise ops and the per-comparator reduction run
    over long contiguous vectors (the comparator weights broadcast over the *input* axis).
    A layer with ``block`` set works on the diagonal ``block x block`` tiles only (a strided
    view), which skips the entries the network keeps at exactly 0. The views cost more
    Python time than a cache-sized chunk's arithmetic, so they are built once per call.
    """

    def __init__(
        self,
        layers: tuple[LayerView, ...],
        wires: int,
        n: int,
        rows: int,
        max_pairs: int,
        like: torch.Tensor,
        backward: bool,
    ) -> None:
        kw = {"dtype": like.dtype, "device": like.device}
        self.rows, self.pad, self.n, self.wires = rows, wires - n, n, wires
        self.eye = torch.eye(wires, **kw).unsqueeze(-1).expand(wires, wires, rows)
        self.coef = torch.zeros(len(layers), 2, max_pairs, rows, **kw)
        self.y = torch.empty(wires, wires, rows, **kw)
        sizes = [v.groups * v.m * self._inputs(v) * rows for v in layers]
        tmp = torch.empty(max(sizes, default=0), **kw)
        self.y_layers = [self._layer(self.y, t, v, tmp) for t, v in enumerate(layers)]
        if backward:
            self.g = torch.empty(wires, wires, rows, **kw)
            self.grad_q = torch.empty(len(layers), max_pairs, rows, **kw)
            flat = torch.empty(sum(sizes), **kw)
            offsets = [sum(sizes[:t]) for t in range(len(layers))]
            self.diffs = [self._diff(flat[o:], v) for o, v in zip(offsets, layers)]
            self.g_layers = [self._layer(self.g, t, v, tmp) for t, v in enumerate(layers)]
            self.grad_q_views = [self._per_pair(self.grad_q[t], v) for t, v in enumerate(layers)]

    def _inputs(self, layer: LayerView) -> int:
        return layer.block or self.n

    def _tiles(self, layer: LayerView) -> int:
        return self.wires // layer.block if layer.block else 1

    def _per_pair(self, buf: torch.Tensor, layer: LayerView) -> torch.Tensor:
        """``buf [max_pairs, rows]`` (comparator slots) as ``[groups/tile, m, rows, tiles]``."""
        nb = self._tiles(layer)
        k = layer.groups * layer.m
        return buf[:k].view(nb, layer.groups // nb, layer.m, self.rows).permute(1, 2, 3, 0)

    def _diff(self, buf: torch.Tensor, layer: LayerView) -> torch.Tensor:
        nb = self._tiles(layer)
        shape = (layer.groups // nb, layer.m, self._inputs(layer), self.rows, nb)
        return buf[: math.prod(shape)].view(shape)

    def _layer(self, y: torch.Tensor, t: int, layer: LayerView, tmp: torch.Tensor):
        """(pairs, wire-a view, wire-b view, diff buffer, signed weights) of layer ``t``.

        pairs: ``[groups/tile, 2, m, inputs, rows, tiles]``.
        """
        if layer.block:
            nb, size = self._tiles(layer), layer.block
            tiles = y.view(nb, size, nb, size, self.rows).diagonal(dim1=0, dim2=2)
        else:
            stop = layer.start + layer.groups * 2 * layer.m
            tiles = y[layer.start : stop, self.pad :].unsqueeze(-1)
        pairs = tiles.unflatten(0, (-1, 2, layer.m))
        nb = self._tiles(layer)
        k = layer.groups * layer.m
        coef = self.coef[t, :, :k].view(2, nb, layer.groups // nb, layer.m, self.rows)
        coef = coef.permute(2, 0, 3, 4, 1).unsqueeze(3)  # [groups/tile, 2, m, 1, rows, tiles]
        return pairs, pairs[:, 0], pairs[:, 1], self._diff(tmp, layer), coef

    def load(self, coef: torch.Tensor) -> int:
        """Copy one chunk's signed weights ``[layers, 2, max_pairs, r]`` in (rest: identity)."""
        r = coef.shape[-1]
        self.coef[..., :r].copy_(coef)
        if r < self.rows:
            self.coef[..., r:].zero_()
        return r

    def identity(self) -> None:
        self.y.copy_(self.eye)

    def forward(self, keep_diffs: bool) -> None:
        """Run every layer on ``y`` in place (optionally keeping each layer's input diffs)."""
        for t, (pairs, a, b, tmp, coef) in enumerate(self.y_layers):
            d = self.diffs[t] if keep_diffs else tmp
            torch.sub(a, b, out=d)
            pairs.addcmul_(d.unsqueeze(1), coef)


def _signed_weights(q_all: torch.Tensor) -> torch.Tensor:
    """``[layers, 2, max_pairs, rows]``: ``-q`` for wire a and ``+q`` for wire b."""
    q = q_all.permute(1, 2, 0)
    return torch.stack((-q, q), dim=1)


class PairMixPermutation(torch.autograd.Function):
    """Soft permutation ``X [rows, n, n]`` (``X[r, input, position]``) from comparator weights.

    ``q_all [rows, layers, max_pairs]`` holds, per layer, the weight each comparator gives to
    the other wire (0 for identity / padded comparators). Differentiable w.r.t. ``q_all``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q_all: torch.Tensor,
        layers: tuple[LayerView, ...],
        wires: int,
        n: int,
        chunk_rows: int | None,
    ) -> torch.Tensor:
        rows = q_all.shape[0]
        out = torch.empty(rows, n, n, dtype=q_all.dtype, device=q_all.device)
        ctx.save_for_backward(q_all)
        ctx.layers, ctx.wires, ctx.n, ctx.chunk_rows = layers, wires, n, chunk_rows
        if rows == 0:
            return out
        per_row = (2 * wires + q_all.shape[2]) * wires * q_all.element_size()
        step = _chunk_rows(rows, per_row, q_all.device, chunk_rows)
        ws = _Workspace(layers, wires, n, step, q_all.shape[2], q_all, backward=False)
        coef_all = _signed_weights(q_all)
        for lo in range(0, rows, step):
            r = ws.load(coef_all[..., lo : lo + step])
            ws.identity()
            ws.forward(keep_diffs=False)
            out[lo : lo + r].copy_(ws.y[ws.pad :, ws.pad :, :r].permute(2, 1, 0))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (q_all,) = ctx.saved_tensors
        layers: tuple[LayerView, ...] = ctx.layers
        wires, n = ctx.wires, ctx.n
        rows = q_all.shape[0]
        grad_q = torch.zeros_like(q_all)
        if not layers or rows == 0:
            return grad_q, None, None, None, None
        per_row = (len(layers) * q_all.shape[2] + 3 * wires) * wires * q_all.element_size()
        step = _chunk_rows(rows, per_row, q_all.device, ctx.chunk_rows)
        ws = _Workspace(layers, wires, n, step, q_all.shape[2], q_all, backward=True)
        coef_all = _signed_weights(q_all)
        grad_out = grad_out.to(q_all.dtype)
        for lo in range(0, rows, step):
            r = ws.load(coef_all[..., lo : lo + step])
            # Recompute the forward for this chunk, keeping each layer's input differences.
            ws.identity()
            ws.forward(keep_diffs=True)
            # Reverse sweep. The layer map is symmetric, so gradients mix like the values do;
            # dL/dq = -sum_r D * (g_a - g_b)  (the sign is applied once at the end).
            ws.g.zero_()
            ws.g[ws.pad :, ws.pad :, :r].copy_(grad_out[lo : lo + r].permute(2, 1, 0))
            for t in range(len(layers) - 1, -1, -1):
                pairs, a, b, gd, coef = ws.g_layers[t]
                torch.sub(a, b, out=gd)
                torch.linalg.vecdot(ws.diffs[t], gd, dim=2, out=ws.grad_q_views[t])
                if t:
                    pairs.addcmul_(gd.unsqueeze(1), coef)
            torch.neg(ws.grad_q[..., :r].permute(2, 0, 1), out=grad_q[lo : lo + r])
        return grad_q, None, None, None, None


def soft_permutation(
    q_all: torch.Tensor,
    layers: tuple[LayerView, ...],
    wires: int,
    n: int,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Apply :class:`PairMixPermutation` (see there for the conventions)."""
    return PairMixPermutation.apply(q_all, layers, wires, n, chunk_rows)
