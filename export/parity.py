"""Parity between an exported graph and an independent reference computation.

FP32 graphs are compared with the PyTorch model (max abs difference on the normalised
features); reduced-precision graphs with the FP32 graph (mean per-patch cosine similarity),
because FP16/INT8 are not expected to match bit-for-bit but must keep the feature geometry
that nearest-neighbour retrieval relies on. Images are generated scenes (structured, like
real photos) rather than uniform noise, which would understate quantisation error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from neco.contract import INPUT_IMAGES, OUTPUT_FEATURES
from neco.export.config import Size
from neco.scenes import generate_scene
from neco.signature import choose_providers

FeatureFn = Callable[[np.ndarray], np.ndarray]
"""UINT8 [B, H, W, 3] -> FP32 [B, h, w, C] normalised features."""


def generated_images(batch: int, size: Size, seed: int) -> np.ndarray:
    """A UINT8 [batch, H, W, 3] batch of generated scenes (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    return np.stack([generate_scene(rng, size=size)[0] for _ in range(batch)])


def ort_session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None, spinning: bool = True):
    """An onnxruntime session with full graph optimisation; CPU provider unless told otherwise.

    `spinning=False` stops idle intra-op threads from busy-waiting, which helps on machines
    shared with other work (measured by benchmarks/inference.py --no-spin).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # parity is measured on CPU unless providers are asked for explicitly (no CUDA preference)
    chosen = choose_providers(providers, ort.get_available_providers(), preferred=())
    return ort.InferenceSession(str(path), options, providers=chosen)


def ort_features(session) -> FeatureFn:
    """Wrap a session as a FeatureFn returning only the normalised features."""
    return lambda images: session.run([OUTPUT_FEATURES], {INPUT_IMAGES: images})[0]


def torch_features(model) -> FeatureFn:
    """Wrap a `DenseFeatureModel` as a FeatureFn (no grad, CPU, FP32)."""
    import torch

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images))[0].numpy()

    return run


def mean_patch_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over patches of two [..., C] feature grids (re-normalised)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dots = (a64 * b64).sum(-1)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float(np.mean(dots / np.maximum(norms, 1e-12)))


@dataclass
class ParityCase:
    batch: int
    height: int
    width: int
    max_abs_diff: float
    mean_cosine: float


@dataclass
class ParityReport:
    """Per-shape differences of a candidate against a reference, plus the worst case."""

    candidate: str
    reference: str
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max(case.max_abs_diff for case in self.cases)

    @property
    def min_mean_cosine(self) -> float:
        return min(case.mean_cosine for case in self.cases)

    def to_dict(self) -> dict:
        return {
            "candidate": self.candidate,
            "reference": self.reference,
            "max_abs_diff": self.max_abs_diff,
            "min_mean_cosine": self.min_mean_cosine,
            "cases": [asdict(case) for case in self.cases],
        }


def compare(
    candidate: FeatureFn,
    reference: FeatureFn,
    shapes: Iterable[tuple[int, Size]],
    *,
    seed: int = 0,
    patch_size: int,
    names: tuple[str, str] = ("candidate", "reference"),
) -> ParityReport:
    """Run both on the same generated batches at every (batch, size) and record differences.

    Both must return the patch grid of a model of `patch_size` (a graph that crops fails here).
    """
    report = ParityReport(candidate=names[0], reference=names[1])
    for index, (batch, size) in enumerate(shapes):
        images = generated_images(batch, size, seed + index)
        got, want = candidate(images), reference(images)
        expected_shape = (batch, size[0] // patch_size, size[1] // patch_size)
        if got.shape != want.shape or got.shape[:3] != expected_shape:
            raise ValueError(
                f"{names[0]} returned {got.shape}, {names[1]} {want.shape}; expected {expected_shape}+(C,)"
            )
        report.cases.append(
            ParityCase(
                batch=batch,
                height=size[0],
                width=size[1],
                max_abs_diff=float(np.abs(got.astype(np.float64) - want).max()),
                mean_cosine=mean_patch_cosine(got, want),
            )
        )
    return report


def shape_grid(sizes: Sequence[Size], batch_sizes: Sequence[int]) -> list[tuple[int, Size]]:
    """Every (batch, size) combination, so one file is checked at all of them."""
    return [(batch, tuple(size)) for size in sizes for batch in batch_sizes]
