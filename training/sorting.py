"""Differentiable sorting networks (bitonic, odd-even) for the NeCo loss.

Same mathematics and output conventions as ``diffsort.DiffSortNet`` (Petersen et al.), which
stays a test-only parity reference:

* ``soft_sort(x)`` sorts ascending along the last axis and returns ``(sorted_values, P)`` with
  ``P[..., i, j]`` the weight of input ``i`` in output position ``j`` (``sorted = x @ P``).
* Comparator of wires ``a < b``: ``alpha = f(steepness * (x_b - x_a))``; the soft minimum
  ``alpha*x_a + (1-alpha)*x_b`` goes to ``a`` (to ``b`` for the descending comparators of the
  bitonic network), the soft maximum to the other wire.
* Bitonic on a size that is not a power of two pads to the next power of two with the padded
  wires at the top; comparators touching a padded wire are the identity (diffsort's rule).
  Odd-even transposition uses ``n`` layers; the unpaired corner wires pass through.
* ``distribution`` picks ``f``: ``cauchy`` (diffsort's and NeCo's default), ``logistic``,
  ``logistic_phi`` (uses ``art_lambda``), ``gaussian``, ``reciprocal``, ``optimal``.

Speed: values and comparator weights (O(layers * n) per row) use plain autograd ops; the
permutation matrix (the O(layers * n^2) part) is built by the pair-mixing kernel in
:mod:`neco.training.sorting_kernels`, which never forms the dense per-layer matrices and
recomputes instead of storing per-layer state for the backward pass.

Precision: float16/bfloat16 inputs are computed in float32 and both outputs are float32 (the
NeCo loss takes logs of the permutation; half precision would lose the small entries).
float32/float64 inputs are computed and returned in their own dtype.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from torch import nn

from neco.errors import InputError
from neco.training.sorting_kernels import LayerView, soft_permutation

Network = Literal["bitonic", "odd_even"]
NETWORKS: tuple[str, ...] = ("bitonic", "odd_even")
DISTRIBUTIONS: tuple[str, ...] = (
    "cauchy",
    "logistic",
    "logistic_phi",
    "gaussian",
    "reciprocal",
    "optimal",
)
DEFAULT_DISTRIBUTION = "cauchy"  # diffsort.DiffSortNet's default, used by the NeCo recipe


class SortingInputError(InputError):
    """The tensor given to the sorter has the wrong rank, size, dtype or non-finite values."""


class SortingConfigError(InputError):
    """Unknown network/distribution or an impossible steepness/art_lambda."""


class _Plan:
    """A network for one size: comparator pairs per layer in padded-wire coordinates."""

    def __init__(self, n: int, wires: int, layers: list[LayerView], comps: list[list[tuple]]):
        self.n, self.wires, self.pad = n, wires, wires - n
        self.layers = tuple(layers)
        self.max_pairs = max((v.groups * v.m for v in layers), default=0)
        # Per layer: (a, b, descending, slot) of each *active* comparator, as index lists.
        self.comps = comps
        self._device_cache: dict[torch.device, list[tuple[torch.Tensor, ...]]] = {}

    def indices(self, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """Per layer ``(a, b, min_pos, max_pos, descending, slot)`` index tensors on ``device``."""
        if device not in self._device_cache:
            out = []
            for comps in self.comps:
                a = torch.tensor([c[0] - self.pad for c in comps], dtype=torch.long)
                b = torch.tensor([c[1] - self.pad for c in comps], dtype=torch.long)
                desc = torch.tensor([c[2] for c in comps], dtype=torch.bool)
                slot = torch.tensor([c[3] for c in comps], dtype=torch.long)
                lo, hi = torch.where(desc, b, a), torch.where(desc, a, b)
                out.append(tuple(t.to(device) for t in (a, b, lo, hi, desc, slot)))
            self._device_cache[device] = out
        return self._device_cache[device]


@lru_cache(maxsize=64)
def _plan(network: str, n: int) -> _Plan:
    """Build (once per size) the comparator layout of ``network`` on ``n`` wires."""
    layers: list[LayerView] = []
    comps: list[list[tuple]] = []
    if network == "bitonic":
        blocks = math.ceil(math.log2(n)) if n > 1 else 0
        wires = 2**blocks
        pad = wires - n
        for block in range(blocks):
            for depth in range(block + 1):
                m = 2 ** (block - depth)
                layer = []
                for start in range(0, wires, 2 * m):
                    for j in range(m):
                        a = start + j
                        if a >= pad:  # b = a + m > a; a padded wire makes it the identity
                            desc = (a // 2 ** (block + 1)) % 2 == 1
                            layer.append((a, a + m, desc, start // 2 + j))
                # Before this layer only the 2**(block+1)-wire groups have mixed (last stage: all).
                layers.append(LayerView(0, wires // (2 * m), m, 2 ** (block + 1) if block + 1 < blocks else 0))
                comps.append(layer)
    else:
        wires = n
        for t in range(n):
            shifted = t % 2
            pairs = [(i, i + 1, False, s) for s, i in enumerate(range(shifted, n - 1, 2))]
            if pairs:  # n = 2 has an empty shifted layer (only its corner pass-throughs)
                layers.append(LayerView(shifted, len(pairs), 1))
                comps.append(pairs)
    return _Plan(n, wires, layers, comps)


def _alpha(v: torch.Tensor, distribution: str, steepness: float, art_lambda: float) -> torch.Tensor:
    """Comparator weight ``alpha = f(v)`` for ``v = x_b - x_a``, as diffsort defines ``f``."""
    if distribution == "cauchy":
        return torch.atan(steepness * v) / math.pi + 0.5
    if distribution == "logistic":
        return torch.sigmoid(v * steepness)
    if distribution == "logistic_phi":
        return torch.sigmoid(v * steepness / (v.abs() + 1e-10).pow(art_lambda))
    if distribution == "gaussian":
        # diffsort divides by sigma = 1/steepness held as a float32 tensor; do the same so the
        # float64 results agree to rounding as well.
        sigma = float(torch.tensor(1.0 / steepness, dtype=torch.float32))
        return 0.5 + 0.5 * torch.erf(v / sigma / math.sqrt(2.0))
    if distribution == "reciprocal":
        s = steepness * v
        return 0.5 * (s / (2 + s.abs()) + 1)
    # "optimal": diffsort's s_best, the relaxation with a bounded error.
    s = steepness * v
    outer = (s > 0.25).to(s.dtype) - (s < -0.25).to(s.dtype)
    return torch.clamp(s, -0.25, 0.25) + 0.5 + outer * (0.25 - 1 / 16 / (s.abs() + 1e-10))


def _mix_values(xa: torch.Tensor, xb: torch.Tensor, alpha: torch.Tensor):
    """Soft min/max ``alpha*xa + (1-alpha)*xb`` and ``(1-alpha)*xa + alpha*xb``.

    The values are diffsort's expanded products (so float32 results agree to rounding even
    when a row mixes magnitudes, where the rounding of either form is large). The gradient is
    taken through the difference form ``xb + alpha*(xa - xb)``: at ties ``xa - xb`` is exactly
    0, so alpha's gradient is exactly 0, whereas autograd through the expanded form leaves a
    rounding residue that the steep relaxations (e.g. ``logistic_phi``) amplify by ~1e3.
    """
    d = xa - xb
    grad_min, grad_max = xb + alpha * d, xa - alpha * d
    with torch.no_grad():
        val_min = alpha * xa + (1 - alpha) * xb
        val_max = (1 - alpha) * xa + alpha * xb
    # grad + (val - grad) == val up to one rounding of a tiny difference (Sterbenz).
    return grad_min + (val_min - grad_min).detach(), grad_max + (val_max - grad_max).detach()


def _validate(
    x: torch.Tensor, network: str, steepness: float, art_lambda: float, distribution: str, check_finite: bool
) -> None:
    if network not in NETWORKS:
        raise SortingConfigError(f"network must be one of {NETWORKS}, got {network!r}")
    if distribution not in DISTRIBUTIONS:
        raise SortingConfigError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not (math.isfinite(steepness) and steepness > 0):
        raise SortingConfigError(f"steepness must be a finite number > 0, got {steepness!r}")
    if not (math.isfinite(art_lambda) and art_lambda >= 0):
        raise SortingConfigError(f"art_lambda must be a finite number >= 0, got {art_lambda!r}")
    if not isinstance(x, torch.Tensor):
        raise SortingInputError(f"soft_sort expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise SortingInputError(f"soft_sort expects a tensor of shape [..., n] with n >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise SortingInputError(f"soft_sort expects a floating-point tensor, got {x.dtype}")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise SortingInputError(
            "soft_sort input contains NaN or +-inf; the relaxed comparators would turn them into "
            "NaN permutation weights (pass check_finite=False to skip this check)"
        )


def soft_sort(
    x: torch.Tensor,
    *,
    network: Network = "bitonic",
    steepness: float = 10.0,
    art_lambda: float = 0.25,
    distribution: str = DEFAULT_DISTRIBUTION,
    check_finite: bool = True,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiably sort ``x [..., n]`` ascending; return ``(sorted [..., n], P [..., n, n])``.

    ``P[..., i, j]`` is the weight of input ``i`` in sorted position ``j``. Gradients flow to
    ``x`` through both outputs. ``check_finite`` raises :class:`SortingInputError` on NaN/inf
    (on CUDA it costs one device sync; with it off, non-finite inputs give NaN outputs).
    ``chunk_rows`` overrides how many rows the permutation kernel processes at once (memory
    vs. speed; the default sizes chunks per device).
    """
    _validate(x, network, steepness, art_lambda, distribution, check_finite)
    plan = _plan(network, x.shape[-1])
    lead, n = x.shape[:-1], x.shape[-1]
    work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    values = x.reshape(-1, n).to(work_dtype)
    rows = values.shape[0]
    q_layers = []
    for a, b, lo, hi, desc, slot in plan.indices(x.device):
        xa, xb = values.index_select(1, a), values.index_select(1, b)
        alpha = _alpha(xb - xa, distribution, steepness, art_lambda)
        v_min, v_max = _mix_values(xa, xb, alpha)
        values = values.index_copy(1, lo, v_min).index_copy(1, hi, v_max)
        # Weight a comparator gives to its other wire: 1-alpha when the minimum stays on the
        # lower wire, alpha when a descending comparator sends it up. Identity slots stay 0.
        q = torch.where(desc, alpha, 1 - alpha)
        q_layers.append(values.new_zeros(rows, plan.max_pairs).index_copy(1, slot, q))
    if q_layers:
        q_all = torch.stack(q_layers, dim=1)
    else:
        q_all = values.new_zeros(rows, 0, 0)
    perm = soft_permutation(q_all, plan.layers, plan.wires, n, chunk_rows)
    return values.reshape(*lead, n), perm.reshape(*lead, n, n)


class SoftSorter(nn.Module):
    """``nn.Module`` holding the sorter settings; ``forward(x)`` is :func:`soft_sort`."""

    def __init__(
        self,
        network: Network = "bitonic",
        *,
        steepness: float = 10.0,
        art_lambda: float = 0.25,
        distribution: str = DEFAULT_DISTRIBUTION,
        check_finite: bool = True,
        chunk_rows: int | None = None,
    ) -> None:
        super().__init__()
        # Validate eagerly so a bad config fails at construction, not at the first step.
        _validate(torch.zeros(1), network, steepness, art_lambda, distribution, False)
        self.network, self.steepness, self.art_lambda = network, float(steepness), float(art_lambda)
        self.distribution, self.check_finite, self.chunk_rows = distribution, check_finite, chunk_rows

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return soft_sort(
            x,
            network=self.network,
            steepness=self.steepness,
            art_lambda=self.art_lambda,
            distribution=self.distribution,
            check_finite=self.check_finite,
            chunk_rows=self.chunk_rows,
        )

    def extra_repr(self) -> str:
        return (
            f"network={self.network!r}, steepness={self.steepness}, "
            f"art_lambda={self.art_lambda}, distribution={self.distribution!r}"
        )
