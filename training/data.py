"""Training data: image sources, a resumable sharded sampler and the multi-crop loader.

A sample is a pure function of (dataset index, augmentation seed), and the sampler derives both
from (run seed, step, rank), so the data stream after `--resume` is exactly the stream an
uninterrupted run would have seen, with any number of workers, on any number of ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from neco.errors import NecoError
from neco.scenes import generate_scene
from neco.training.config import DataSection
from neco.training.views import MultiCropViews

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"})
MAX_CONSECUTIVE_BAD = 64
"""After this many unreadable files in a row the folder is considered broken, not noisy."""


class DataError(NecoError, RuntimeError):
    """The training images cannot be read at all."""


class ImageFolderSource:
    """Every image file under `root`, recursively (COCO train2017 is one such folder)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {str(self.root)!r} is not a directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """uint8 [3, H, W] RGB; raises OSError/ValueError for unreadable or corrupt files."""
        with Image.open(self.files[index]) as img:
            array = np.asarray(img.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def describe(self, index: int) -> str:
        return str(self.files[index])


class SceneSource:
    """Procedurally generated scenes (neco.scenes), generated on the fly from (seed, index)."""

    def __init__(self, count: int, size: int, num_classes: int, seed: int) -> None:
        self.count, self.size, self.num_classes, self.seed = count, size, num_classes, seed

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> Tensor:
        rng = np.random.default_rng([self.seed, index])
        image, _ = generate_scene(rng, size=(self.size, self.size), num_classes=self.num_classes)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)

    def describe(self, index: int) -> str:
        return f"scene #{index}"


ImageSource = ImageFolderSource | SceneSource


class NeCoDataset(Dataset):
    """Map-style dataset indexed by (image index, augmentation seed) pairs from the sampler.

    Unreadable images are skipped (the next index is used), warned about once, and counted in
    the sample's `skipped` field so the trainer can report the total across workers.
    """

    def __init__(self, source: ImageSource, views: MultiCropViews) -> None:
        self.source, self.views = source, views
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = item
        skipped = 0
        for _ in range(MAX_CONSECUTIVE_BAD):
            try:
                image = self.source.load(index)
                break
            except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
                if index not in self._warned:
                    self._warned.add(index)
                    log.warning("skipping unreadable image %s: %s", self.source.describe(index), exc)
                skipped += 1
                index = (index + 1) % len(self.source)
        else:
            raise DataError(
                f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images ending at {self.source.describe(index)}"
            )
        sample = self.views(image, seed)
        sample["skipped"] = torch.tensor(skipped)
        return sample


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite stream of per-rank batches, starting at any global step.

    Epoch e visits a permutation seeded by (seed, e); global step s takes the s-th slice of
    `batch_size * world_size` indices (remainders dropped) and this rank its own part of it.
    The augmentation seed of each item is derived from (seed, step, position in the global
    batch), so it never depends on workers or on where a run was resumed.
    """

    def __init__(
        self, length: int, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.global_batch = batch_size * world_size
        if length < self.global_batch:
            raise DataError(f"dataset has {length} images, fewer than one global batch ({self.global_batch})")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start_step, self.rank = start_step, rank
        self.steps_per_epoch = length // self.global_batch

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        first = within * self.global_batch + self.rank * self.batch_size
        items = []
        for offset in range(self.batch_size):
            in_global_batch = self.rank * self.batch_size + offset
            aug_seed = (self.seed * 0x9E3779B1 + step * self.global_batch + in_global_batch) % 2**62
            items.append((int(perm[first + offset]), aug_seed))
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:  # an infinite sampler; DataLoader only needs this for len(loader)
        return 2**31


def collate(samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def make_loader(
    dataset: NeCoDataset, sampler: ResumableBatchSampler, data: DataSection, pin_memory: bool
) -> DataLoader:
    """A loader over the infinite sampler; workers are persistent so steps never wait on forks."""
    num_workers = data.num_workers
    extra = {"prefetch_factor": data.prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        # Its own generator: creating the iterator must not consume the global RNG, which a
        # resumed run restores from its checkpoint just before.
        generator=torch.Generator().manual_seed(sampler.seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate,
        **extra,
    )
