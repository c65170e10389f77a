"""The size policy as a decision the user sees: which size a bank is built at, and queries against it.

Features of one object at two scales are different vectors, so a query resized differently from
its bank matches the wrong patches and the answer is silently wrong (a bank built at 112 px
queried at 224 px labels everything "background"). Hence two rules, applied by `segment` and
`novelty` (`neco.client.retrieval.resolve_bank`):

* a query against a built bank uses the bank's size; a different `size` is refused unless the
  caller passes `allow_size_mismatch=True` (CLI: `--allow-size-mismatch`);
* a support set given without a size (pairs or a folder, built on the fly) uses its images' own
  size: the first image's shorter side, at most `DEFAULT_IMAGE_SIZE` (`support_size`).
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neco.client.backend import FeatureBackend
from neco.client.bank import MemoryBank
from neco.client.bank_manifest import DEFAULT_IMAGE_SIZE
from neco.client.errors import BankError, SupportSetError
from neco.client.images import SizeSpec
from neco.layout import image_mask_pairs

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


def support_size(support: Any) -> SizeSpec:
    """The size policy of a support set given without one: its first image's shorter side, at most 448.

    Small images are not upsampled (112-px scenes at 448 cost 16x the patches and match a query
    worse), large ones are shrunk to the default. A one-pass iterable cannot be peeked at without
    losing its first item, so it gets the default; so does an image whose header cannot be read
    (building the bank then names it).
    """
    first: Any = None
    if isinstance(support, (str, Path)) and Path(support).is_dir():
        pairs = image_mask_pairs(Path(support), SupportSetError)
        first = pairs[0][0] if pairs else None
    elif isinstance(support, Sequence) and len(support) > 0 and isinstance(support[0], (tuple, list)):
        first = support[0][0]
    side = _shorter_side(first) if first is not None else None
    return DEFAULT_IMAGE_SIZE if side is None else min(side, DEFAULT_IMAGE_SIZE)


def build_for_query(backend: FeatureBackend, support: Any, size: SizeSpec | None, **options: Any) -> MemoryBank:
    """The bank `segment`/`novelty` build on the fly: at `size`, or at the support images' own size.

    Its warnings (a class list inferred from the masks) are issued again at the line outside the
    client that asked for the segmentation, not inside it, so a user sees which call to fix.
    """
    image_size = size if size is not None else support_size(support)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = MemoryBank.build(backend, support, **options, image_size=image_size)
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("neco.client"):
        frame, level = frame.f_back, level + 1
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=level)
    return bank


def _shorter_side(image: Any) -> int | None:
    """The shorter side of an image from its header (never decoded), or None when it cannot be read."""
    if isinstance(image, np.ndarray):
        return int(min(image.shape[:2])) if image.ndim >= 2 and min(image.shape[:2]) > 0 else None
    if isinstance(image, Image.Image):
        return min(image.size) or None
    try:
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
        with Image.open(source) as opened:
            return min(opened.size) or None
    except (OSError, ValueError, TypeError, AttributeError, Image.DecompressionBombError):
        return None
