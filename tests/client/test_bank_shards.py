"""Issue 19 part 3: three shard banks merged equal the single-process bank (rows, labels, masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neco.client import BankError, MemoryBank, segment
from neco.client.cli import main
from neco.client.errors import SupportSetError
from neco.client.support import parse_shard
from neco.scenes import write_scene_dataset


def test_three_shards_merge_into_the_single_process_bank(colour_backend, tmp_path: Path) -> None:
    root = write_scene_dataset(tmp_path / "data", splits={"train": 7, "val": 1}, size=(112, 112), num_classes=4, seed=3)
    support = root / "train"
    whole = MemoryBank.build(colour_backend, support, image_size=112, memory_size=140, seed=5)
    shards = [
        MemoryBank.build(colour_backend, support, image_size=112, memory_size=140, seed=5, shard=(i, 3))
        for i in range(3)
    ]
    assert [b.num_images for b in shards] == [3, 2, 2]
    for i, shard in enumerate(shards):
        shard.save(tmp_path / f"shard{i}")
    merged = MemoryBank.merge([MemoryBank.load(tmp_path / f"shard{i}") for i in (2, 0, 1)])  # any order
    np.testing.assert_array_equal(merged.features, whole.features)
    np.testing.assert_array_equal(merged.soft_labels, whole.soft_labels)
    np.testing.assert_array_equal(merged.image_ids, whole.image_ids)
    assert merged.num_images == whole.num_images == 7
    query = next((root / "val" / "images").iterdir())
    a = segment(colour_backend, query, whole)
    b = segment(colour_backend, query, merged)
    np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(BankError, match="share image ids"):
        MemoryBank.merge([shards[0], shards[0]])


def test_shard_specs_are_checked() -> None:
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(SupportSetError):
            parse_shard(bad)


def test_merge_cli_writes_the_joined_bank(colour_backend, tmp_path: Path) -> None:
    root = write_scene_dataset(tmp_path / "data", splits={"train": 3}, size=(56, 56), num_classes=4, seed=1)
    for i in range(2):
        MemoryBank.build(colour_backend, root / "train", image_size=56, shard=(i, 2)).save(tmp_path / f"s{i}")
    assert main(["bank", "merge", str(tmp_path / "out"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    merged = MemoryBank.load(tmp_path / "out")
    whole = MemoryBank.build(colour_backend, root / "train", image_size=56)
    np.testing.assert_array_equal(merged.features, whole.features)
