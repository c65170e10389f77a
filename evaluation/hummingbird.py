"""Hummingbird in-context segmentation (Balažević et al., NeurIPS 2023) on any FeatureBackend.

Protocol: a memory bank of L2-normalised patch features with per-patch label distributions is
built from the train split (optionally bounded, rare classes favoured, over several augmented
passes); every val image is segmented by k-NN label transfer (k = 30, softmax(sim / 0.02)),
class scores are upsampled bilinearly to the mask's size, and mIoU ignores 255.

Nothing here re-implements retrieval: the bank is `neco.client.MemoryBank.build` and the label
transfer is `neco.client.retrieval.segment_features`, i.e. exactly what `neco segment` runs.
Evaluation only adds the dataset plumbing, augmentation passes and the metric.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from neco.evaluation.backends import iter_features
from neco.evaluation.config import EvalConfig
from neco.evaluation.datasets import load_dataset
from neco.evaluation.metrics import ConfusionAccumulator, IoUResult

if TYPE_CHECKING:
    from neco.client import FeatureBackend, MemoryBank, SizeSpec


class HummingbirdConfig(EvalConfig):
    """Settings of `neco eval hummingbird`; defaults follow the published protocol."""

    val_subset: int = Field(1, ge=1, description="use 1/N of the val split (quick checks only)")
    k: int = Field(30, ge=1)
    beta: float = Field(0.02, gt=0, description="softmax temperature over neighbour similarities")
    memory_size: int | None = Field(None, ge=1, description="bank size bound (patches); None keeps all")
    augment_passes: int = Field(1, ge=1, description="passes over the train split; passes > 1 are augmented")
    fp16_bank: bool = False


class AugmentedPairs(Sequence[tuple[np.ndarray, np.ndarray]]):
    """A seeded augmented view of (image, mask) pairs: random resized crop + horizontal flip.

    Geometry only, applied identically to image and mask: cropping and flipping move pixels
    without blending them, so labels stay exact; the bank then resizes each crop with the
    client's policy (masks by nearest neighbour) like any support image.
    """

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], seed: int, min_scale: float = 0.4) -> None:
        self.pairs = pairs
        self.seed = seed
        self.min_scale = min_scale
        self.class_names = getattr(pairs, "class_names", None)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        image, mask = self.pairs[index]
        rng = np.random.default_rng([self.seed, index])
        h, w = mask.shape
        scale = np.sqrt(rng.uniform(self.min_scale, 1.0))
        ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image, mask = image[top : top + ch, left : left + cw], mask[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))


def build_bank(
    backend: FeatureBackend,
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    size: SizeSpec,
    *,
    memory_size: int | None = None,
    augment_passes: int = 1,
    fp16: bool = False,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> MemoryBank:
    """The client's MemoryBank over `augment_passes` passes; `memory_size` is split across them."""
    from neco.client import MemoryBank

    per_pass = None if memory_size is None else max(1, memory_size // augment_passes)
    bank = MemoryBank.build(
        backend,
        train,
        class_names=class_names,
        image_size=size,
        memory_size=per_pass,
        dtype="float16" if fp16 else "float32",
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    for p in range(1, augment_passes):
        bank.add(
            backend,
            AugmentedPairs(train, seed=seed + p),
            memory_size=per_pass,
            batch_size=batch_size,
            seed=seed + p,
            progress=progress,
        )
    return bank


def evaluate_bank(
    backend: FeatureBackend,
    bank: MemoryBank,
    val: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    k: int = 30,
    beta: float = 0.02,
    batch_size: int = 8,
    progress: bool = True,
) -> IoUResult:
    """Segment every val image with the client's label transfer and accumulate one confusion matrix.

    Same-size prepared queries share one backend call (`iter_features`); each image then
    goes through `segment_features`, which returns the mask at the image's own size.
    """
    from neco.client import check_contract, segment_features

    check_contract(backend.contract, bank)
    acc = ConfusionAccumulator(list(bank.class_names))
    for feats, target in iter_features(
        backend, val, bank.image_size, batch_size=batch_size, desc="segment val", progress=progress
    ):
        acc.update(segment_features(feats, bank, target.shape, k=k, temperature=beta).mask, target)
    return acc.result()


def run_hummingbird(cfg: HummingbirdConfig, backend: FeatureBackend | None = None) -> dict[str, object]:
    """`neco eval hummingbird`: load splits, build the bank, score val, print and write the report."""
    started = time.perf_counter()
    train = load_dataset(cfg.dataset, cfg.data_root, cfg.train_split, subset=cfg.train_subset, seed=cfg.seed)
    val = load_dataset(cfg.dataset, cfg.data_root, cfg.val_split, subset=cfg.val_subset, seed=cfg.seed)
    backend = backend if backend is not None else cfg.backend.build()
    print(f"hummingbird: {len(train)} {train.name}/{train.split} support images -> bank, {len(val)} val images")
    bank = build_bank(
        backend,
        train,
        train.class_names,
        cfg.size,
        memory_size=cfg.memory_size,
        augment_passes=cfg.augment_passes,
        fp16=cfg.fp16_bank,
        batch_size=cfg.backend.batch_size,
        seed=cfg.seed,
    )
    print(f"hummingbird: {bank!r}")
    result = evaluate_bank(backend, bank, val, k=cfg.k, beta=cfg.beta, batch_size=cfg.backend.batch_size)
    report: dict[str, object] = {
        "protocol": "hummingbird",
        "dataset": cfg.dataset,
        "train_split": train.split,
        "val_split": val.split,
        "num_train": len(train),
        "num_val": len(val),
        "bank_patches": len(bank),
        "contract": backend.contract.model_dump(),
        "config": cfg.model_dump(mode="json"),
        **result.to_dict(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(result.table())
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(report, indent=2))
        print(f"hummingbird: wrote {cfg.out}")
    return report
