"""Hummingbird in-context segmentation (Balažević et al., NeurIPS 2023) on any FeatureBackend.

Two protocols (`--protocol`, see `protocols.PROTOCOL_HELP` and docs/evaluation.md): `hbird-eval`,
the published open-hummingbird-eval scoring (`protocols.hbird_eval`, fed here from the backend),
and `strict`, this project's own, described next.

Strict protocol: a memory bank of L2-normalised patch features with per-patch label distributions is
built from the train split (optionally bounded, rare classes favoured, over several augmented
passes); every val image is segmented by k-NN label transfer (k = 30, softmax(sim / 0.02)),
class scores are upsampled bilinearly to the mask's size, and mIoU ignores 255.

`upsample` (`--upsample`): bilinear by default in both protocols, as published, so the numbers stay
comparable; `guided` upsamples the class scores with the image as guide (`neco.client.upsample`).
The report says which one produced every number. The strict protocol also reports boundary IoU
(`neco.evaluation.boundary`, bands of 2% of the image diagonal) beside mIoU; hbird-eval does not,
since its labels are only matched to classes after the whole split is scored.

Nothing here re-implements retrieval: the bank is `neco.client.MemoryBank.build` and the label
transfer is `neco.client.retrieval.segment_features`, i.e. exactly what `neco segment` runs.
Evaluation only adds the dataset plumbing, augmentation passes and the metric.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from neco.contract import DEFAULT_K, DEFAULT_TEMPERATURE
from neco.evaluation.augment import SquareViews
from neco.evaluation.backends import iter_features
from neco.evaluation.boundary import BoundaryAccumulator
from neco.evaluation.config import EvalConfig
from neco.evaluation.datasets import SegmentationDataset, load_dataset
from neco.evaluation.metrics import ConfusionAccumulator, IoUResult
from neco.evaluation.protocols import PROTOCOL_HELP, PROTOCOLS, Protocol, hbird_eval

if TYPE_CHECKING:
    from neco.client import FeatureBackend, MemoryBank
    from neco.client.images import SizeSpec


ProtocolChoice = Literal["hbird-eval", "strict", "both"]
Upsample = Literal["bilinear", "guided"]
PUBLISHED_LAYOUTS: frozenset[str] = frozenset({"voc", "ade20k", "coco-stuff", "cityscapes"})
"""Dataset layouts whose default protocol is the published one (`folder` defaults to strict)."""


def deprecated_beta(data: Any) -> Any:
    """Accept the old `beta` key as `temperature` (one name across client and evaluation)."""
    if isinstance(data, dict) and "beta" in data:
        if "temperature" in data:
            raise ValueError("give temperature, not both temperature and its deprecated alias beta")
        warnings.warn("config key 'beta' is deprecated; use 'temperature'", DeprecationWarning, stacklevel=2)
        data = {("temperature" if key == "beta" else key): value for key, value in data.items()}
    return data


class HummingbirdConfig(EvalConfig):
    """Settings of `neco eval hummingbird`; defaults follow the published protocol."""

    protocol: ProtocolChoice | None = Field(
        None, description="hbird-eval | strict | both; default hbird-eval for voc/ade20k/coco-stuff/cityscapes"
    )
    val_subset: int = Field(1, ge=1, description="use 1/N of the val split (quick checks only)")
    k: int = Field(DEFAULT_K, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, description="softmax temperature over similarities")
    memory_size: int | None = Field(None, ge=1, description="bank size bound (patches); None keeps all")
    augment_passes: int = Field(1, ge=1, description="memory passes (strict: passes > 1 augmented; hbird-eval: all)")
    fp16_bank: bool = Field(False, description="strict only: store the bank in float16")
    upsample: Upsample = Field(
        "bilinear", description="patch scores to pixels: bilinear (the protocol's) or guided by the image"
    )

    _beta = model_validator(mode="before")(deprecated_beta)

    @property
    def protocols(self) -> tuple[Protocol, ...]:
        """The protocols to run, primary first."""
        if self.protocol == "both":
            return PROTOCOLS
        if self.protocol is not None:
            return (self.protocol,)
        return ("hbird-eval",) if self.dataset in PUBLISHED_LAYOUTS else ("strict",)


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


class WithImages(Sequence[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]):
    """(image, (mask, image)) views of pairs: `iter_features` passes the second item through, so
    guided upsampling receives each query image beside its features without a second read."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:  # type: ignore[override]
        image, mask = self.pairs[index]
        return image, (mask, image)


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
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 8,
    progress: bool = True,
    beta: float | None = None,
    upsample: Upsample = "bilinear",
    boundary: BoundaryAccumulator | None = None,
) -> IoUResult:
    """Segment every val image with the client's label transfer and accumulate one confusion matrix.

    Same-size prepared queries share one backend call (`iter_features`); each image then
    goes through `segment_features`, which returns the mask at the image's own size, upsampled
    by `upsample` (guided: with the val image as guide). `boundary`, when given, accumulates
    boundary IoU over the same masks. `beta` is the deprecated name of `temperature`.
    """
    from neco.client.retrieval import check_contract, segment_features

    if beta is not None:
        warnings.warn("evaluate_bank(beta=...) is deprecated; use temperature=", DeprecationWarning, stacklevel=2)
        temperature = beta
    check_contract(backend.contract, bank)
    acc = ConfusionAccumulator(list(bank.class_names))
    for feats, (target, image) in iter_features(
        backend, WithImages(val), bank.image_size, batch_size=batch_size, desc="segment val", progress=progress
    ):
        guide = image if upsample == "guided" else None
        mask = segment_features(feats, bank, target.shape, k=k, temperature=temperature, upsample=upsample, guide=guide)
        acc.update(mask.mask, target)
        if boundary is not None:
            boundary.update(mask.mask, target)
    return acc.result()


def run_strict(
    cfg: HummingbirdConfig, backend: FeatureBackend, train: SegmentationDataset, val: SegmentationDataset
) -> dict[str, object]:
    """The strict protocol: the client's bank and label transfer, masks scored at full size."""
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
    print(f"hummingbird[strict]: {bank!r}, {cfg.upsample} upsampling")
    boundary = BoundaryAccumulator(list(train.class_names))
    result = evaluate_bank(
        backend,
        bank,
        val,
        k=cfg.k,
        temperature=cfg.temperature,
        batch_size=cfg.backend.batch_size,
        upsample=cfg.upsample,
        boundary=boundary,
    )
    edges = boundary.result()
    print(result.table())
    print(f"boundary IoU (bands of 2% of the diagonal) {100 * edges.miou:5.1f}")
    return {
        **result.to_dict(),
        "boundary_iou": edges.miou,
        "per_class_boundary_iou": {
            n: (None if np.isnan(v) else float(v)) for n, v in zip(edges.class_names, edges.per_class)
        },
        "upsample": cfg.upsample,
        "matching": "none",
        "bank_patches": len(bank),
        "input_size": cfg.input_size,
    }


def run_hbird_eval(
    cfg: HummingbirdConfig, backend: FeatureBackend, train: SegmentationDataset, val: SegmentationDataset
) -> dict[str, object]:
    """The published protocol: square views from the backend into `protocols.hbird_eval`."""
    size = backend.contract.floor_to_patch(cfg.input_size)
    batch = cfg.backend.batch_size
    per_image = None if cfg.memory_size is None else max(1, cfg.memory_size // (len(train) * cfg.augment_passes))
    memory = (
        pair
        for p in range(cfg.augment_passes)
        for pair in iter_features(
            backend,
            SquareViews(train, size, augment_pass=p, seed=cfg.seed),
            (size, size),
            batch_size=batch,
            desc=f"memory pass {p + 1}",
        )
    )
    views = iter_features(
        backend, WithImages(SquareViews(val, size)), (size, size), batch_size=batch, desc="segment val"
    )
    queries = ((features, mask, image) for features, (mask, image) in views)
    result = hbird_eval(
        memory,
        queries,
        train.class_names,
        k=cfg.k,
        temperature=cfg.temperature,
        memory_per_image=per_image,
        seed=cfg.seed,
        upsample=cfg.upsample,
    )
    print(f"hummingbird[hbird-eval]: memory of {result.bank_patches} patches, {cfg.upsample} upsampling")
    print(result.iou.table())
    return {**result.iou.to_dict(), "upsample": cfg.upsample, "bank_patches": result.bank_patches, "input_size": size}


RUNNERS = {"hbird-eval": run_hbird_eval, "strict": run_strict}


def run_hummingbird(cfg: HummingbirdConfig, backend: FeatureBackend | None = None) -> dict[str, object]:
    """`neco eval hummingbird`: load splits, run each chosen protocol, print and write the report.

    The top-level numbers are the first protocol's (named by `protocol`); `results` holds every
    protocol that ran, each with its own description, so no number is ever without its protocol.
    """
    started = time.perf_counter()
    train = load_dataset(cfg.dataset, cfg.data_root, cfg.train_split, subset=cfg.train_subset, seed=cfg.seed)
    val = load_dataset(cfg.dataset, cfg.data_root, cfg.val_split, subset=cfg.val_subset, seed=cfg.seed)
    backend = backend if backend is not None else cfg.build_backend()
    cfg.fit_to(backend.contract)
    print(
        f"hummingbird: {len(train)} {train.name}/{train.split} support images -> memory, {len(val)} val images, "
        f"input {cfg.size_text} px"
    )
    results = {
        name: {"description": PROTOCOL_HELP[name], **RUNNERS[name](cfg, backend, train, val)} for name in cfg.protocols
    }
    primary = cfg.protocols[0]
    report: dict[str, object] = {
        **cfg.report_header("hummingbird", train, val, backend.contract),
        "protocol": primary,
        **results[primary],
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
    cfg.write_report(report)
    return report
