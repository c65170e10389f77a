"""What a memory bank is besides its rows, as pydantic models: settings, index spec, manifest.json.

A manifest comes from disk and may have been edited by hand or by an attacker, so every field
is validated by its model before the bank is built from it: an image size must be a positive
integer or two of them (not "abc", 0, -448 or 448.5, which would silently change the patch
grid), counts are non-negative integers, class names a list of strings (a string "abcd" is not
four classes). `bank_io` turns a failed validation into `BankCorruptError`.

The models dump to exactly the JSON that format version 2 has always held, so banks written
before these models existed load unchanged.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from neco.client.novelty import NoveltyEntry
from neco.contract import BANK_FORMAT_VERSION, DEFAULT_INPUT_SIZE, ModelContract

DEFAULT_IMAGE_SIZE = DEFAULT_INPUT_SIZE
"""Shorter side of support and query images, as in the Hummingbird protocol."""
FORMAT_NAME = "neco-memory-bank"

StorageDtype = Literal["float32", "float16"]
Side = Annotated[int, Field(strict=True, gt=0)]
ImageSize = Union[Side, tuple[Side, Side]]
"""Shorter side N, or exact (height, width); strict integers, so 448.5 or "448" are refused."""
Count = Annotated[int, Field(strict=True, ge=0)]


class IndexSpec(BaseModel):
    """Which faiss index searches the bank (all use inner product on unit vectors = cosine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = Field(default=1024, ge=1, description="IVF cells")
    nprobe: int = Field(default=32, ge=1, description="IVF cells visited per query")
    hnsw_m: int = Field(default=32, ge=4, description="HNSW graph degree")
    ef_search: int = Field(default=128, ge=1, description="HNSW search breadth")

    def create(self, features: np.ndarray) -> faiss.Index:
        """Build (and for IVF, train) an index over float32 unit vectors."""
        dim = features.shape[1]
        if self.kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(dim)
        elif self.kind == "ivf":
            nlist = min(self.nlist, max(1, features.shape[0] // 39))  # faiss wants >= 39 points per cell
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(features)
        else:
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.configure(index)
        index.add(features)
        return index

    def configure(self, index: faiss.Index) -> None:
        """Apply search-time settings (not stored by faiss.write_index for every index type)."""
        if self.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.nprobe
        elif self.kind == "hnsw":
            index.hnsw.efSearch = self.ef_search


class BankSettings(BaseModel):
    """How a bank's rows are read: class names, the query resize policy, storage dtype, index.

    Banks that share settings (and a model contract) can be merged or appended to each other.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    class_names: list[StrictStr]
    image_size: ImageSize = DEFAULT_IMAGE_SIZE
    dtype: StorageDtype = "float32"
    index: IndexSpec = IndexSpec()
    classes_inferred: StrictBool = False
    """True when no class list was given and K was inferred from the largest mask label."""


class BankCounts(BaseModel):
    """Sizes a reader can show without loading the arrays (`patches` is checked against them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patches: Count
    images: Count
    class_mass: list[float] = []


class FileEntry(BaseModel):
    """Checksum and size of one data file of the bank folder."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    sha256: StrictStr
    bytes: Count


class BankManifest(BankSettings):
    """manifest.json of a bank folder (format version `BANK_FORMAT_VERSION`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # unknown keys from a later minor writer are kept out

    format: Literal["neco-memory-bank"] = FORMAT_NAME
    format_version: Annotated[int, Field(strict=True, ge=1, le=BANK_FORMAT_VERSION)] = BANK_FORMAT_VERSION
    contract: ModelContract
    counts: BankCounts
    novelty: NoveltyEntry | None = None
    files: dict[str, FileEntry]

    @property
    def settings(self) -> BankSettings:
        """The manifest's `BankSettings` fields as their own model."""
        return BankSettings(**{name: getattr(self, name) for name in BankSettings.model_fields})
