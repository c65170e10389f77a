"""Config fields shared by `neco eval hummingbird` and `neco eval linear` (one definition)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from neco.contract import DEFAULT_INPUT_SIZE, PATCH_SIZE
from neco.evaluation.backends import BackendConfig
from neco.evaluation.datasets import DatasetKind

if TYPE_CHECKING:
    from neco.client import SizeSpec


class EvalConfig(BaseModel):
    """Dataset, splits, input size, backend and report path of one evaluation run."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetKind = "folder"
    data_root: Path
    train_split: str = "train"
    val_split: str = "val"
    train_subset: int = Field(1, ge=1, description="use 1/N of the train split (protocol: 1, 8, ..., 128)")
    input_size: int = Field(
        DEFAULT_INPUT_SIZE, ge=PATCH_SIZE, description="encoder input side (rounded to a multiple of 14)"
    )
    square: bool = Field(True, description="resize to input_size x input_size (protocol) or shorter side")
    seed: int = 0
    backend: BackendConfig = BackendConfig()
    out: Path | None = None

    @property
    def size(self) -> SizeSpec:
        """The client's resize-policy argument for this config."""
        return (self.input_size, self.input_size) if self.square else self.input_size
