"""Where a memory bank's vectors can live besides an in-process faiss index.

`neco.client.stores.milvus`: a Milvus collection (Milvus Lite file or cluster). Every store
follows the `VectorStore` protocol that `neco.client.bank.MemoryBank` searches through, and
imports its own client library only when opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class VectorStore(Protocol):
    """Where a bank's vectors can live instead of a faiss index (e.g. `stores.milvus.MilvusStore`).

    Rows are addressed by their key (`BankRows.keys`); the store keeps it as its primary key.
    """

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def insert(self, first_row: int, features: np.ndarray, soft_labels: np.ndarray, image_ids: np.ndarray) -> None: ...

    def delete_images(self, image_ids: Sequence[int]) -> None: ...
