"""Turning a support set into bank rows: the build options, per-image budgets, batched extraction,
labelling, sampling.

Each image's patch sampling draws from its own generator, seeded by (seed, index of the image in
the whole support set), so an image contributes the same rows whether it is built alone, in a
shard (`neco bank build --shard i/n`) or with the rest of the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from neco.client.backend import FeatureBackend, batch_features, prepare_for
from neco.client.bank_manifest import IndexSpec, StorageDtype
from neco.client.errors import SupportSetError
from neco.client.images import SizeSpec, describe, load_mask, resize_mask
from neco.client.novelty import NoveltySpec
from neco.client.support import SupportSet, iter_pairs, patch_soft_labels, sample_rare_first, shard_length


class BuildOptions(BaseModel):
    """Everything `MemoryBank.build` takes besides the backend and the support set.

    `memory_size` bounds the bank: each of the support set's n images keeps memory_size // n
    patches (rare classes favoured); iterables without a length need `patches_per_image`. A
    class list (`class_names`, `classes.json`, or the dataset's `class_names`) or `num_classes`
    fixes K. `novelty` also fits the NECO subspace; `shard=(i, n)` builds the i-th interleaved shard.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    class_names: list[str] | None = None
    num_classes: int | None = None
    image_size: SizeSpec | None = None
    """None: the support images' own size (`neco.client.support.support_size`), as segment() does."""
    dtype: StorageDtype = "float32"
    index: IndexSpec | None = None
    memory_size: int | None = None
    patches_per_image: int | None = None
    batch_size: int = 8
    seed: int = 0
    progress: bool = False
    novelty: NoveltySpec | None = None
    shard: tuple[int, int] = (0, 1)


@dataclass
class Extracted:
    """Rows gathered per image: unit features, soft labels (width = largest label seen + 1 or K)."""

    features: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    image_ids: list[np.ndarray] = field(default_factory=list)
    count: int = 0


def normalise(features: np.ndarray) -> np.ndarray:
    """Unit-normalise rows in float32; backends promise it, re-doing it makes fp16 storage safe."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def per_image_budget(support: SupportSet, memory_size: int | None, patches_per_image: int | None) -> int | None:
    """Patches each image keeps: `patches_per_image`, or a share of `memory_size` over the whole set."""
    if memory_size is not None and patches_per_image is not None:
        raise ValueError("give memory_size or patches_per_image, not both")
    if patches_per_image is not None:
        if patches_per_image < 1:
            raise ValueError(f"patches_per_image must be >= 1, got {patches_per_image}")
        return patches_per_image
    if memory_size is None:
        return None
    if memory_size < 1:
        raise ValueError(f"memory_size must be >= 1, got {memory_size}")
    if support.length is None:
        raise ValueError(
            f"memory_size needs a support set of known length; {support.source} has none: use patches_per_image"
        )
    if support.length == 0:
        raise SupportSetError(f"the support set ({support.source}) is empty")
    return max(1, memory_size // support.length)


def extract(
    backend: FeatureBackend, support: SupportSet, num_classes: int | None, budget: int | None, options: BuildOptions
) -> Extracted:
    """Run the backend over the support set in same-size batches; keep labelled/sampled patches."""
    patch, image_size, dtype = backend.contract.patch_size, options.image_size, options.dtype
    out = Extracted()
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # (array, soft, chosen rows, image id)

    # The bar counts images whose features came back, not images read: reading is fast, the
    # server is the slow part, so a bar that ran ahead of it would end long before the build.
    bar = tqdm(total=shard_length(support), desc="bank features", unit="img", disable=not options.progress)

    def flush() -> None:
        if not pending:
            return
        dense = batch_features(backend, [item[0] for item in pending])
        bar.update(len(pending))
        for (_, soft, chosen, image_id), grid_feats in zip(pending, dense):
            # cast per image so an fp16 bank never holds all its features in float32 at once
            out.features.append(normalise(grid_feats.reshape(-1, grid_feats.shape[-1])[chosen]).astype(dtype))
            out.labels.append(soft[chosen])
            out.image_ids.append(np.full(len(chosen), image_id, dtype=np.int64))
        pending.clear()

    for index, image_like, mask_like in iter_pairs(support):
        name = f"support item {index} ({describe(image_like)})"
        prepared = prepare_for(backend, image_like, image_size)  # within the backend's own limits
        mask = load_mask(mask_like)
        if mask.shape != prepared.original_size:
            raise SupportSetError(
                f"{name}: mask is {mask.shape[0]}x{mask.shape[1]} but the image is "
                f"{prepared.original_size[0]}x{prepared.original_size[1]}"
            )
        soft, keep = patch_soft_labels(resize_mask(mask, prepared.size), patch, num_classes, name)
        labelled = np.flatnonzero(keep)
        if budget is not None:
            labelled = labelled[sample_rare_first(soft[labelled], budget, np.random.default_rng([options.seed, index]))]
        if pending and pending[0][0].shape != prepared.array.shape:
            flush()
        pending.append((prepared.array, soft, labelled, index))
        if len(pending) >= options.batch_size:
            flush()
        out.count += 1
    flush()
    bar.close()
    return out
