"""Image sources (folder with corrupt files, generated scenes) and the resumable sampler."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neco.contract import DEFAULT_ARCH, ModelContract
from neco.training.config import CropSection, DataSection
from neco.training.data import (
    DataError,
    ImageFolderSource,
    NeCoDataset,
    ResumableBatchSampler,
    SceneSource,
    collate,
    make_loader,
)
from neco.training.views import MultiCropViews

VIEWS = MultiCropViews(CropSection(global_size=42, local_size=28, num_local=2), ModelContract.for_arch(DEFAULT_ARCH))


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "a" / "b").mkdir(parents=True)
    for i, sub in enumerate(["", "a", "a/b"]):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / sub / f"img{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")


def test_folder_is_recursive_and_skips_corrupt_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_folder(tmp_path)
    source = ImageFolderSource(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in source.files]
    assert names == ["a/b/img2.png", "a/broken.jpg", "a/img1.png", "img0.png"]
    dataset = NeCoDataset(source, VIEWS)
    with caplog.at_level(logging.WARNING):
        sample = dataset[(1, 7)]
    assert int(sample["skipped"]) == 1 and "broken.jpg" in caplog.text
    torch.testing.assert_close(sample["global"], dataset[(2, 7)]["global"])  # the next image stood in
    assert int(dataset[(3, 7)]["skipped"]) == 0


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(DataError, match="no images"):
        ImageFolderSource(tmp_path)
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    dataset = NeCoDataset(ImageFolderSource(tmp_path), VIEWS)
    with pytest.raises(DataError, match="consecutive unreadable"):
        dataset[(0, 0)]


def test_scene_source_is_deterministic() -> None:
    source = SceneSource(4, 56, 4, seed=3)
    assert torch.equal(source.load(2), source.load(2)) and source.load(2).shape == (3, 56, 56)
    assert not torch.equal(source.load(1), source.load(2))


def test_sampler_resumes_mid_stream_and_shards_ranks() -> None:
    full = ResumableBatchSampler(10, 2, seed=1)
    stream = [b for _, b in zip(range(12), iter(full))]
    resumed = [b for _, b in zip(range(5), iter(ResumableBatchSampler(10, 2, seed=1, start_step=7)))]
    assert resumed == stream[7:12]
    epoch0 = [i for batch in stream[:5] for i, _ in batch]
    assert sorted(epoch0) == list(range(10))  # one epoch is one permutation
    ranks = [ResumableBatchSampler(10, 2, seed=1, rank=r, world_size=2).batch(3) for r in range(2)]
    assert not {i for i, _ in ranks[0]} & {i for i, _ in ranks[1]}
    assert len({seed for r in ranks for _, seed in r}) == 4  # distinct augmentation seeds
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, seed=0, world_size=2)


def test_loader_with_workers_matches_in_process() -> None:
    dataset = NeCoDataset(SceneSource(6, 56, 4, seed=0), VIEWS)
    sampler = ResumableBatchSampler(6, 2, seed=4)
    with_workers = next(iter(make_loader(dataset, sampler, DataSection(num_workers=1), pin_memory=False)))
    direct = collate([dataset[item] for item in sampler.batch(0)])
    assert with_workers.keys() == direct.keys()
    for key in direct:
        assert torch.equal(with_workers[key], direct[key]), key
    assert with_workers["boxes"].shape == (2, 2, 4, 2, 4)
