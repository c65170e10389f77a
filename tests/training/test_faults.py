"""Training and model files under faults: SIGKILL anywhere, corrupt files, leftovers, CLI slips.

The reference is one uninterrupted 6-step run on a 2-block ViT-S (CPU, one thread). Every
faulty history — killed inside a checkpoint write, killed at a random moment, resumed past a
corrupt latest checkpoint — must end in bit-identical weights. Corrupt, truncated or
wrong-version checkpoints and artefacts are refused with typed errors instead of loading.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neco.contract import ARTEFACT_METADATA, ARTEFACT_WEIGHTS
from neco.model import WeightsError, load_backbone, read_artefact_contract
from neco.model.artefact import checksum_path, config_hash
from neco.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    remove_stale_files,
    save_checkpoint,
)
from neco.training.run import build_arg_parser, train
from tests.training.tiny import tiny_backbone, tiny_config

REPO = Path(__file__).resolve().parents[2]
STEPS = {"optim": {"steps": 6}}
"""Checkpoints at steps 2, 4 and 6 (tiny_config checkpoints every 2 steps), keep 2."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """output_dir of the uninterrupted run (checkpoints 4 and 6, artefact)."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("neco.training.trainer.create_backbone", tiny_backbone)
        train(tiny_config(out, **STEPS))
    torch.set_num_threads(threads)
    yield out


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr("neco.training.trainer.create_backbone", tiny_backbone)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_run(ours: Path, reference: Path) -> None:
    """Final checkpoint and artefact weights are bit-identical; the contract hash too."""
    a = load_checkpoint(reference / "checkpoints" / "step_00000006.pt")
    b = load_checkpoint(ours / "checkpoints" / "step_00000006.pt")
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert torch.equal(a["queue"]["buffer"], b["queue"]["buffer"])
    wa, wb = load_file(reference / "artefact" / ARTEFACT_WEIGHTS), load_file(ours / "artefact" / ARTEFACT_WEIGHTS)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # output_dir differs between the runs, the recipe does not: same training_hash
    assert read_artefact_contract(ours / "artefact") == read_artefact_contract(reference / "artefact")


def _flip_byte(path: Path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= 0x10
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- SIGKILL, then --resume
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from neco.training import checkpoint, trainer
    from neco.training.run import train
    from tests.training.tiny import tiny_backbone, tiny_config

    out, mode, at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    trainer.create_backbone = tiny_backbone
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_save, real_checksum = torch.save, checkpoint.write_checksum

    def save(obj, target, *args, **kwargs):  # torch.save of the checkpoint's temporary file
        real_save(obj, target, *args, **kwargs)
        if mode == "mid-write" and obj.get("step") == at:
            data = Path(target).read_bytes()
            Path(target).write_bytes(data[: len(data) // 3])  # the write got a third of the way
            die()

    def checksum(path, digest_of=None):  # temporary complete, sidecar written, rename pending
        real_checksum(path, digest_of)
        if mode == "before-rename" and path.name == f"step_{at:08d}.pt":
            die()

    torch.save, checkpoint.write_checksum = save, checksum
    train(tiny_config(out, optim={"steps": 6}))
    """
)


def _start_child(out: Path, mode: str, at: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out), mode, str(at)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
def test_sigkill_inside_a_checkpoint_write_then_resume_is_bit_identical(
    mode: str, reference: Path, tiny: None, tmp_path: Path
) -> None:
    child = _start_child(tmp_path, mode, at=4)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    checkpoints = tmp_path / "checkpoints"
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert leftovers and [p.name for p in list_checkpoints(checkpoints)] == ["step_00000002.pt"], leftovers
    train(tiny_config(tmp_path, **STEPS), resume=True)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # temporaries removed
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_00000004.pt",
        "step_00000004.pt.sha256",
        "step_00000006.pt",
        "step_00000006.pt.sha256",
    ]
    _assert_same_run(tmp_path, reference)


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(reference: Path, tiny: None, tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**32)
    delay = random.Random(seed).uniform(0.0, 3.0)
    child = _start_child(tmp_path, "plain")
    first = tmp_path / "checkpoints" / "step_00000002.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate(timeout=60)
    assert list_checkpoints(first.parent), err[-2000:]  # step 2's may be pruned if the run got far
    print(f"seed {seed}: killed {delay:.2f} s after step 2's checkpoint (return code {child.returncode})")
    train(tiny_config(tmp_path, **STEPS), resume=True)
    _assert_same_run(tmp_path, reference)


# --------------------------------------------------------------------------- corrupt checkpoints
def test_resume_falls_back_past_a_corrupt_latest_checkpoint(
    reference: Path, tiny: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    latest = run / "checkpoints" / "step_00000006.pt"
    _flip_byte(latest)
    stale = run / "checkpoints" / ".step_00000008.pt.tmp-4242-deadbeef"
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="neco.training"):
        train(tiny_config(run, **STEPS), resume=True)
    assert any("skipping unusable checkpoint" in r.message and "step_00000006.pt" in r.message for r in caplog.records)
    assert not stale.exists()
    _assert_same_run(run, reference)  # steps 5 and 6 were recomputed from step 4


def test_resume_with_only_corrupt_checkpoints_lists_every_reason(reference: Path, tiny: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for path in list_checkpoints(run / "checkpoints"):
        _flip_byte(path)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*step_00000006.*step_00000004"):
        train(tiny_config(run, **STEPS), resume=True)
    with pytest.raises(CheckpointError, match="does not match"):  # an explicit file: no fallback
        train(tiny_config(run, **STEPS), resume=run / "checkpoints" / "step_00000004.pt")


def _small_state() -> dict:
    return {"weights": torch.full((4096,), 1.5), "config": {"model": {}}, "trained_step": 1}


def test_a_flipped_byte_loads_silently_without_the_checksum_and_is_refused_with_it(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, _small_state())
    assert checksum_path(path).read_text().endswith("  step_00000001.pt\n")  # `sha256sum -c` format
    data = bytearray(path.read_bytes())
    data[data.index(b"\x00\x00\xc0\x3f" * 8) + 2] ^= 0x01  # one bit of one float of the tensor
    path.write_bytes(bytes(data))
    silently = torch.load(path, weights_only=True)  # what a plain reader gets: a different number
    assert not torch.equal(silently["weights"], _small_state()["weights"])
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path)
    with pytest.raises(WeightsError, match="does not match"):
        load_backbone(path)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "no-checksum", "garbage-checksum", "version-2", "version-0", "version-true", "kind"],
)
def test_damaged_or_foreign_checkpoints_are_refused(damage: str, tmp_path: Path) -> None:
    state = _small_state()
    if damage.startswith("version-"):
        state["version"] = {"version-2": 2, "version-0": 0, "version-true": True}[damage]
    if damage == "kind":
        state["kind"] = "something-else"
    path = save_checkpoint(tmp_path, 1, state)  # state's kind/version win over the writer's: a foreign file
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "no-checksum":
        checksum_path(path).unlink()
    elif damage == "garbage-checksum":
        checksum_path(path).write_text("")
    message = {"no-checksum": "missing", "kind": "not a NeCo training checkpoint"}.get(damage, "does not match")
    if damage.startswith("version-"):
        message = "version"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_stale_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    keep = save_checkpoint(tmp_path, 2, _small_state())
    stale = [
        tmp_path / ".step_00000004.pt.tmp-123-0badcafe",
        tmp_path / ".step_00000004.pt.sha256.tmp-123-0badcafe",
        tmp_path / "step_00000004.pt.sha256",  # sidecar whose checkpoint was never renamed into place
    ]
    foreign = [tmp_path / "notes.txt", tmp_path / ".step_4.pt.tmp-1", tmp_path / ".other.tmp-1-2"]
    for path in stale + foreign:
        path.write_text("x")
    assert sorted(remove_stale_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in foreign) and keep.exists() and checksum_path(keep).exists()
    load_checkpoint(keep)


# --------------------------------------------------------------------------- artefact files
@pytest.fixture
def artefact(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("neco.model.backbone.create_backbone", tiny_backbone)
    copy = tmp_path / "artefact"
    shutil.copytree(reference / "artefact", copy)
    load_backbone(copy)  # intact: loads
    return copy


@pytest.mark.parametrize("where", [0.0005, 0.5, 0.9999])
def test_a_bit_flipped_artefact_is_refused(artefact: Path, where: float) -> None:
    _flip_byte(artefact / ARTEFACT_WEIGHTS, where)
    with pytest.raises(WeightsError, match="differs from metadata.json"):
        load_backbone(artefact)


def test_truncated_or_missing_artefact_weights_are_refused(artefact: Path) -> None:
    weights = artefact / ARTEFACT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="corrupt"):
        load_backbone(artefact)
    weights.unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_backbone(artefact)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "newer than supported"),
        (lambda m: m.update(format_version=0), "positive integer"),
        (lambda m: m.update(format_version=-1), "positive integer"),
        (lambda m: m.update(format_version=True), "positive integer"),
        (lambda m: m.update(format_version="1"), "positive integer"),
        (lambda m: m.pop("contract"), "malformed"),
        (lambda m: m["contract"].update(embed_dim="wide"), "malformed"),
    ],
)
def test_wrong_version_or_malformed_metadata_is_refused(artefact: Path, edit, message: str) -> None:
    path = artefact / ARTEFACT_METADATA
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=message):
        load_backbone(artefact)


def test_unparsable_metadata_is_refused(artefact: Path) -> None:
    path = artefact / ARTEFACT_METADATA
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(WeightsError, match="malformed"):
        load_backbone(artefact)
    path.write_text("[1, 2]")
    with pytest.raises(WeightsError, match="not a JSON object"):
        load_backbone(artefact)


# --------------------------------------------------------------------------- CLI and hash
@pytest.mark.parametrize(
    ("argv", "resume", "overrides"),
    [
        (["--resume", "optim.steps=10", "seed=1"], True, ["optim.steps=10", "seed=1"]),
        (["seed=1", "--resume"], True, ["seed=1"]),
        (["--resume", "ckpt.pt", "seed=1"], "ckpt.pt", ["seed=1"]),
        (["seed=1"], False, ["seed=1"]),
    ],
)
def test_resume_before_an_override_is_not_a_checkpoint_path(argv: list[str], resume, overrides: list[str]) -> None:
    from neco.cli import build_parser

    for args in (
        build_arg_parser().parse_args(["--config", "c.yaml", *argv]),
        build_parser().parse_args(["train", "--config", "c.yaml", *argv]),
    ):
        assert (args.resume, args.overrides) == (resume, overrides)


def test_resume_accepts_an_existing_checkpoint_whose_path_has_an_equals_sign(tmp_path: Path) -> None:
    path = tmp_path / "lr=0.1" / "step_00000002.pt"
    path.parent.mkdir()
    path.write_bytes(b"")
    args = build_arg_parser().parse_args(["--config", "c.yaml", "--resume", str(path)])
    assert (args.resume, args.overrides) == (str(path), [])


def test_training_hash_ignores_where_the_run_writes(tmp_path: Path) -> None:
    a = tiny_config(tmp_path / "a").to_dict()
    b = tiny_config(tmp_path / "b", runtime={"progress": True, "tensorboard": True, "checkpoint_every": 7}).to_dict()
    assert a != b and config_hash(a) == config_hash(b)
    assert config_hash(tiny_config(tmp_path / "a", seed=1).to_dict()) != config_hash(a)
    assert config_hash(tiny_config(tmp_path / "a", runtime={"precision": "bf16"}).to_dict()) != config_hash(a)
