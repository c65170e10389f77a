"""Helpers shared by the serving tests: an independent in-process onnxruntime reference."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from neco.contract import INPUT_IMAGES, OUTPUTS


@pytest.fixture(scope="session")
def reference_features(model_repository_model_dir: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Run the exported model.onnx directly with onnxruntime (no Triton, no neco.serving code)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(model_repository_model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, session.run(list(OUTPUTS), {INPUT_IMAGES: images})))

    return run


def random_images(seed: int, batch: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def reap(process: subprocess.Popen) -> None:
    """Kill a server that a failed assertion left running, so no process outlives its test."""
    if process.poll() is None:
        process.kill()
        process.wait()
