"""Evaluation-stage fixtures: a seeded random-init backbone saved as a training artefact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neco.contract import ModelContract
from neco.model import create_backbone, save_artefact

ARCH = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="session")
def random_artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ViT-S/14-reg artefact (what `load_backbone` and `--model` accept)."""
    torch.manual_seed(0)
    model = create_backbone(ARCH).eval()
    return save_artefact(model, ModelContract.for_arch(ARCH), tmp_path_factory.mktemp("artefact"), {"seed": 0})
