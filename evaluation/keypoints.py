"""Keypoint correspondence on SPair-71k: nearest-patch matching of dense features, PCK@alpha.

For every annotated pair both images are resized to the square input size; each source keypoint
selects the patch under it, the target patch with the highest cosine similarity is the match
(optionally refined by a soft-argmax over a window of patches around it), and the match's centre,
mapped back to target pixels, is the prediction. A prediction is correct at alpha when it lies
within alpha * max(width, height) of the target bounding box from the ground truth (PCK@0.1 is the
headline, @0.05 the strict one). Per category: correct keypoints / keypoints; the mean runs over
categories; `all` pools every keypoint.

Layout (SPair-71k): `JPEGImages/<category>/<name>.jpg` and `PairAnnotation/{trn,val,test}/*.json`
holding `src_imname`, `trg_imname`, `src_kps`, `trg_kps` ([[x, y], ...]), `src_bndbox`,
`trg_bndbox` ([x1, y1, x2, y2]) and `category`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from neco.atomic import make_parent
from neco.contract import DEFAULT_INPUT_SIZE
from neco.evaluation.backends import BackendConfig
from neco.evaluation.datasets import DatasetError, MissingDatasetFileError, read_image

if TYPE_CHECKING:
    from neco.client import FeatureBackend

SPAIR_SPLITS = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.05)


@dataclass(frozen=True)
class KeypointPair:
    """One annotated pair; keypoints (N, 2) as (x, y) pixels, boxes (x1, y1, x2, y2)."""

    category: str
    source: Path
    target: Path
    source_kps: np.ndarray
    target_kps: np.ndarray
    target_bbox: tuple[float, float, float, float]


def _pair(path: Path, images: Path) -> KeypointPair:
    try:
        data = json.loads(path.read_text())
        category = str(data["category"])
        src, trg = np.asarray(data["src_kps"], dtype=np.float64), np.asarray(data["trg_kps"], dtype=np.float64)
        box = tuple(float(v) for v in data["trg_bndbox"])
        source, target = images / category / data["src_imname"], images / category / data["trg_imname"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: not a SPair pair annotation ({exc})") from None
    if src.ndim != 2 or src.shape[1:] != (2,) or src.shape != trg.shape or len(box) != 4:
        raise DatasetError(f"{path}: src_kps/trg_kps must be equal-length [[x, y], ...], trg_bndbox 4 numbers")
    return KeypointPair(category, source, target, src, trg, box)  # type: ignore[arg-type]


def spair_pairs(root: str | Path, split: str = "test", categories: Sequence[str] | None = None) -> list[KeypointPair]:
    """Every pair of `split` (SPair's trn / val / test), sorted by category then file name."""
    if split not in SPAIR_SPLITS:
        raise DatasetError(f"unknown SPair split {split!r}; use one of {sorted(SPAIR_SPLITS)}")
    root = Path(root)
    base = root if (root / "PairAnnotation").is_dir() else root / "SPair-71k"
    annotations = base / "PairAnnotation" / SPAIR_SPLITS[split]
    if not annotations.is_dir():
        raise MissingDatasetFileError(f"missing directory {annotations}")
    pairs = [_pair(p, base / "JPEGImages") for p in sorted(annotations.glob("*.json"))]
    if categories:
        pairs = [p for p in pairs if p.category in set(categories)]
    if not pairs:
        raise DatasetError(f"no pair annotations in {annotations}" + (f" for {list(categories)}" if categories else ""))
    return sorted(pairs, key=lambda p: p.category)


def keypoint_patches(kps: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(N, 2) (row, col) of the patch under each (x, y) keypoint of an image resized onto `grid`."""
    (height, width), (rows, cols) = image_size, grid
    col = np.clip(np.floor(kps[:, 0] * cols / width), 0, cols - 1)
    row = np.clip(np.floor(kps[:, 1] * rows / height), 0, rows - 1)
    return np.stack([row, col], axis=1).astype(np.int64)


def match_keypoints(
    source: np.ndarray,
    target: np.ndarray,
    source_kps: np.ndarray,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    *,
    soft_argmax: bool = False,
    temperature: float = 0.04,
    window: int = 2,
) -> np.ndarray:
    """(N, 2) predicted (x, y) in target pixels for (h, w, C) source / target feature maps."""
    rows, cols, channels = target.shape
    patches = keypoint_patches(source_kps, source_size, source.shape[:2])
    queries = source[patches[:, 0], patches[:, 1]].astype(np.float64)
    keys = target.reshape(-1, channels).astype(np.float64)
    queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    sims = (queries @ keys.T).reshape(-1, rows, cols)
    best = sims.reshape(len(sims), -1).argmax(axis=1)
    position = np.stack([best // cols, best % cols], axis=1).astype(np.float64)
    if soft_argmax:
        for i, (r, c) in enumerate(position.astype(np.int64)):
            r0, r1, c0, c1 = (
                max(r - window, 0),
                min(r + window + 1, rows),
                max(c - window, 0),
                min(c + window + 1, cols),
            )
            local = sims[i, r0:r1, c0:c1] / temperature
            weights = np.exp(local - local.max())
            weights /= weights.sum()
            yy, xx = np.mgrid[r0:r1, c0:c1]
            position[i] = (weights * yy).sum(), (weights * xx).sum()
    height, width = target_size
    return np.stack([(position[:, 1] + 0.5) * width / cols, (position[:, 0] + 0.5) * height / rows], axis=1)


def pck_correct(predicted: np.ndarray, truth: np.ndarray, bbox: Sequence[float], alpha: float) -> np.ndarray:
    """(N,) bool: within alpha * max(bbox width, height) of the ground truth."""
    x1, y1, x2, y2 = bbox
    return np.linalg.norm(predicted - truth, axis=1) <= alpha * max(x2 - x1, y2 - y1)


class PCKAccumulator:
    """Correct / total keypoints per (category, alpha)."""

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS) -> None:
        self.alphas = tuple(alphas)
        self.correct: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(self.alphas), dtype=np.int64))
        self.total: dict[str, int] = defaultdict(int)

    def update(self, category: str, predicted: np.ndarray, truth: np.ndarray, bbox: Sequence[float]) -> None:
        self.correct[category] += [int(pck_correct(predicted, truth, bbox, a).sum()) for a in self.alphas]
        self.total[category] += len(truth)

    def result(self) -> dict[str, object]:
        """{'pck@a': {'mean': over categories, 'all': pooled, 'per_category': {...}}, 'keypoints': n}."""
        out: dict[str, object] = {}
        names = sorted(self.total)
        for i, alpha in enumerate(self.alphas):
            per = {c: float(self.correct[c][i] / self.total[c]) for c in names if self.total[c]}
            pooled = sum(int(self.correct[c][i]) for c in names) / max(sum(self.total.values()), 1)
            out[f"pck@{alpha:g}"] = {"mean": float(np.mean(list(per.values()))), "all": pooled, "per_category": per}
        out["keypoints"] = int(sum(self.total.values()))
        return out


class KeypointConfig(BaseModel):
    """Settings of `neco eval keypoints`."""

    model_config = ConfigDict(extra="forbid")

    data_root: Path
    split: str = "test"
    categories: list[str] | None = None
    max_pairs: int | None = Field(None, ge=1, description="score only the first N pairs (quick checks)")
    input_size: int = Field(
        DEFAULT_INPUT_SIZE, ge=1, description="square input side (rounded down to a multiple of the model's patch)"
    )
    soft_argmax: bool = False
    soft_argmax_temperature: float = Field(0.04, gt=0)
    soft_argmax_window: int = Field(2, ge=0, description="patches around the best match")
    alphas: list[float] = Field(list(DEFAULT_ALPHAS), min_length=1)
    backend: BackendConfig = BackendConfig()
    out: Path | None = None


def run_keypoints(cfg: KeypointConfig, backend: FeatureBackend | None = None) -> dict[str, object]:
    """`neco eval keypoints`: PCK over SPair pairs; features cached per category."""
    from tqdm import tqdm

    from neco.client import batch_features, prepare_image

    started = time.perf_counter()
    pairs = spair_pairs(cfg.data_root, cfg.split, cfg.categories)[: cfg.max_pairs]
    backend = backend if backend is not None else cfg.backend.build()
    size = backend.contract.floor_to_patch(cfg.input_size)
    cache: dict[Path, tuple[np.ndarray, tuple[int, int]]] = {}
    acc = PCKAccumulator(cfg.alphas)

    def features(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        if path not in cache:
            prepared = prepare_image(read_image(path), (size, size), backend.contract.patch_size)
            cache[path] = batch_features(backend, [prepared.array])[0], prepared.original_size
        return cache[path]

    category = None
    for pair in tqdm(pairs, desc="keypoint pairs", unit="pair"):
        if pair.category != category:
            cache.clear()  # images never repeat across categories
            category = pair.category
        (src, src_size), (trg, trg_size) = features(pair.source), features(pair.target)
        predicted = match_keypoints(
            src, trg, pair.source_kps, src_size, trg_size, soft_argmax=cfg.soft_argmax,
            temperature=cfg.soft_argmax_temperature, window=cfg.soft_argmax_window,
        )  # fmt: skip
        acc.update(pair.category, predicted, pair.target_kps, pair.target_bbox)
    result = acc.result()
    for alpha in cfg.alphas:
        pck = 100 * result[f"pck@{alpha:g}"]["mean"]
        print(f"keypoints: PCK@{alpha:g} mean over categories {pck:.1f} (input {size}x{size} px)")
    report: dict[str, object] = {
        "evaluation": "keypoints",
        "protocol": "spair-pck-bbox",
        "split": cfg.split,
        "num_pairs": len(pairs),
        "input_size": size,
        "contract": backend.contract.model_dump(),
        "config": cfg.model_dump(mode="json"),
        **result,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if cfg.out is not None:
        make_parent(cfg.out)
        cfg.out.write_text(json.dumps(report, indent=2))
    return report
