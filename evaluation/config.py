"""Config fields shared by every `neco eval` command (one definition), and the backend they build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from neco.atomic import make_parent
from neco.contract import DEFAULT_INPUT_SIZE, ModelContract
from neco.evaluation.backends import BackendConfig, BackendError
from neco.evaluation.datasets import DatasetKind

if TYPE_CHECKING:
    from neco.client import FeatureBackend
    from neco.client.images import SizeSpec


class EvalConfig(BaseModel):
    """Dataset, splits, input size, backend and report path of one evaluation run."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetKind = "folder"
    data_root: Path
    train_split: str = "train"
    val_split: str = "val"
    train_subset: int = Field(1, ge=1, description="use 1/N of the train split (protocol: 1, 8, ..., 128)")
    input_size: int = Field(
        DEFAULT_INPUT_SIZE, ge=1, description="encoder input side (rounded down to a multiple of the model's patch)"
    )
    square: bool = Field(True, description="resize to input_size x input_size (protocol) or shorter side")
    seed: int = 0
    hbird_eval_std_typo: bool = Field(
        False,
        description="normalise with open-hummingbird-eval's typo'd ImageNet std (blue 0.255, not 0.225) for "
        "bit-exact reproduction of its numbers; torch backend only",
    )
    backend: BackendConfig = BackendConfig()
    out: Path | None = None
    _asked_input_size: int | None = PrivateAttr(None)
    _patch: int | None = PrivateAttr(None)

    def fit_to(self, contract: ModelContract) -> None:
        """Make `input_size` the side the encoder runs at for this model: rounded down to its patch
        multiple (as the published protocol does), so every printed and written result states the
        size that ran; the asked one is kept for the report (`input_size_asked`)."""
        side = contract.floor_to_patch(self.input_size)
        if side != self.input_size:
            self._asked_input_size, self.input_size, self._patch = self.input_size, side, contract.patch_size

    @property
    def size(self) -> SizeSpec:
        """The client's resize-policy argument for this config."""
        return (self.input_size, self.input_size) if self.square else self.input_size

    @property
    def size_text(self) -> str:
        """The resize policy as printed with every result (numbers depend on it: docs/client.md)."""
        text = f"{self.input_size}x{self.input_size}" if self.square else f"shorter side {self.input_size}"
        if self._asked_input_size is not None:
            text += f" (input_size {self._asked_input_size} rounded down to a multiple of {self._patch})"
        return text

    def report_header(self, evaluation: str, train: Any, val: Any, contract: ModelContract) -> dict[str, object]:
        """The fields every evaluation report starts with (which data, which model, which size, which config)."""
        asked = {} if self._asked_input_size is None else {"input_size_asked": self._asked_input_size}
        return {
            "evaluation": evaluation,
            "input_size": self.input_size,
            **asked,
            "resize": "square" if self.square else "shorter side",
            "dataset": self.dataset,
            "train_split": train.split,
            "val_split": val.split,
            "num_train": len(train),
            "num_val": len(val),
            "contract": contract.model_dump(),
            "config": self.model_dump(mode="json"),
        }

    def write_report(self, report: dict[str, object]) -> None:
        """Write the JSON report to `out`, when one is configured."""
        if self.out is not None:
            make_parent(self.out)
            self.out.write_text(json.dumps(report, indent=2))
            print(f"{report.get('evaluation', 'evaluation')}: wrote {self.out}")

    def build_backend(self) -> FeatureBackend:
        """The configured backend (see `build_backend`)."""
        return build_backend(self.backend, self.hbird_eval_std_typo)


def served_unless_given(backend: BackendConfig) -> BackendConfig:
    """The backend kind nobody chose on the command line: torch with weights to load (`--source` / `--arch`),
    else the served model (triton), as every other `neco` command uses; a chosen kind is kept."""
    if "kind" in backend.model_fields_set or backend.model is not None or backend.arch is not None:
        return backend
    return backend.model_copy(update={"kind": "triton"})


def build_backend(backend: BackendConfig, hbird_eval_std_typo: bool = False) -> FeatureBackend:
    """`backend.build()`, or with `hbird_eval_std_typo` a torch backend normalising with that std."""
    if not hbird_eval_std_typo:
        return backend.build()
    if backend.kind != "torch":
        raise BackendError(
            "hbird_eval_std_typo needs --backend torch: exported and served graphs normalise inside "
            "with the correct ImageNet std"
        )
    from neco.evaluation.backends import TorchBackend
    from neco.evaluation.protocols import HBIRD_EVAL_STD_TYPO
    from neco.model import load_backbone

    source = backend.model if backend.model is not None else backend.arch
    if source is None:
        raise BackendError("--backend torch needs --source (artefact/checkpoint) or --arch")
    model, contract = load_backbone(source, backend.arch)
    typo = contract.model_copy(update={"std": HBIRD_EVAL_STD_TYPO})
    return TorchBackend(model=model, contract=typo, device=backend.device, batch_size=backend.batch_size)
