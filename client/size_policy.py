"""The size policy as a decision the user sees: which size a bank is built at, and queries against it.

Features of one object at two scales are different vectors, so a query resized differently from
its bank matches the wrong patches and the answer is silently wrong (a bank built at 112 px
queried at 224 px labels everything "background"). Hence two rules, applied by `segment` and
`novelty` (`neco.client.retrieval.resolve_bank`):

* a query against a built bank uses the bank's size; a different `size` is refused unless the
  caller passes `allow_size_mismatch=True` (CLI: `--allow-size-mismatch`);
* a support set given without a size (pairs or a folder, built on the fly) uses its images' own
  size: the first image's shorter side, at most `DEFAULT_IMAGE_SIZE`; `MemoryBank.build` applies
  this rule itself (`neco.client.support.support_size`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from neco.client.backend import FeatureBackend
from neco.client.bank import MemoryBank
from neco.client.errors import BankError
from neco.client.images import SizeSpec

SIZE_MISMATCH_FLAG = "--allow-size-mismatch"
"""The CLI flag that lets a query size differ from its bank's (named in the refusal)."""


def comparable(size: SizeSpec | Sequence[int]) -> int | tuple[int, ...]:
    """A size policy in one comparable form (a manifest may hold a list where a caller gives a tuple)."""
    return tuple(int(side) for side in size) if isinstance(size, (tuple, list)) else int(size)


def shown(size: SizeSpec | Sequence[int]) -> str:
    """A size policy as a user reads it: `448` resizes the shorter side, `448x448` is exact."""
    policy = comparable(size)
    return f"{policy[0]}x{policy[1]} (exact)" if isinstance(policy, tuple) else f"{policy} (shorter side)"


def check_query_size(size: SizeSpec | None, bank_size: SizeSpec, allow_size_mismatch: bool = False) -> None:
    """Refuse a query `size` other than the bank's (None: the bank's is used), unless allowed."""
    if size is None or allow_size_mismatch or comparable(size) == comparable(bank_size):
        return
    raise BankError(
        f"the query size {shown(size)} differs from the size the bank was built with, {shown(bank_size)}: "
        f"features at another scale match the wrong patches. Leave the size out to use the bank's, or pass "
        f"allow_size_mismatch=True ({SIZE_MISMATCH_FLAG}) to query at {shown(size)} anyway"
    )


def build_for_query(backend: FeatureBackend, support: Any, size: SizeSpec | None, **options: Any) -> MemoryBank:
    """The bank `segment`/`novelty` build on the fly: at `size`, or at the support images' own size.

    Its warnings (a class list inferred from the masks) are issued again at the line outside the
    client that asked for the segmentation, not inside it, so a user sees which call to fix.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = MemoryBank.build(backend, support, **options, image_size=size)  # None: the images' own
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("neco.client"):
        frame, level = frame.f_back, level + 1
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=level)
    return bank
