"""What the client commands tell a user: missing banks, progress, where outputs go, the input size."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.cli import main
from neco.client import MemoryBank, novelty, segment
from neco.client.errors import BankError
from neco.client.novelty import NoveltySpec
from neco.client.size_policy import shown
from neco.client.support import support_size
from neco.contract import ModelContract
from neco.scenes import generate_scene
from tests.client.conftest import ARCH


def test_a_missing_bank_path_is_called_a_bank(colour_backend, tmp_path: Path) -> None:
    with pytest.raises(BankError) as info:
        segment(colour_backend, np.zeros((28, 28, 3), np.uint8), tmp_path / "banks" / "scenes")
    message = str(info.value)
    assert message.startswith(f"memory bank {str(tmp_path / 'banks' / 'scenes')!r} does not exist")
    assert "neco bank build" in message and "support folder" not in message


def test_segment_reports_the_encoder_input_size(colour_backend, scenes_224) -> None:
    bank = MemoryBank.build(colour_backend, scenes_224[:2], image_size=112, num_classes=4)
    image = scenes_224[2][0][:, :168]  # 224x168: the shorter side goes to 112
    result = segment(colour_backend, image, bank)
    assert result.input_size == (round(224 * 112 / 168 / 14) * 14, 112)  # aspect kept, sides snapped to 14 px
    assert result.mask.shape == (224, 168)
    assert segment(colour_backend, image, bank, size=(56, 56), allow_size_mismatch=True).input_size == (56, 56)


class RecordingBar:
    """Stands in for tqdm: records each update and how many backend calls had returned by then."""

    def __init__(self, backend, total: int | None = None, **_: object) -> None:
        self.backend, self.total, self.updates = backend, total, []
        RecordingBar.last = self

    def update(self, n: int) -> None:
        self.updates.append((n, len(self.backend.calls)))

    def close(self) -> None:
        pass


def test_the_bank_progress_bar_counts_features_received(colour_backend, scenes_224, monkeypatch) -> None:
    import neco.client.bank_build as bank_build

    monkeypatch.setattr(bank_build, "tqdm", lambda **kw: RecordingBar(colour_backend, **kw))
    MemoryBank.build(colour_backend, scenes_224 * 2, image_size=56, batch_size=3, progress=True, num_classes=4)
    bar = RecordingBar.last
    assert bar.total == 8
    # each step comes after the batch's features came back: 3 images after call 1, 3 after 2, 2 after 3
    assert bar.updates == [(3, 1), (3, 2), (2, 3)]


def test_out_outside_the_working_directory_is_announced(tmp_path: Path, monkeypatch, capsys) -> None:
    from neco.atomic import make_parent

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    make_parent(Path("results/masks/a.png"))  # inside the cwd: created silently
    assert (work / "results" / "masks").is_dir() and capsys.readouterr().err == ""
    make_parent(elsewhere / "deep" / "a.png")
    assert (elsewhere / "deep").is_dir()
    assert capsys.readouterr().err.strip() == (
        f"note: creating folder {str(elsewhere / 'deep')!r} (outside the working directory)"
    )
    make_parent(elsewhere / "deep" / "b.png")  # exists now: nothing to say
    assert capsys.readouterr().err == ""


@pytest.fixture
def bank_112(colour_backend) -> MemoryBank:
    rng = np.random.default_rng(3)
    return MemoryBank.build(
        colour_backend, [generate_scene(rng, size=(112, 112), num_classes=4) for _ in range(3)], num_classes=4,
        image_size=112, novelty=NoveltySpec(),
    )  # fmt: skip


@pytest.mark.parametrize("size", [224, (112, 112)])
def test_a_query_size_other_than_the_banks_is_refused_naming_both(colour_backend, bank_112, size) -> None:
    """Regression: a 112-px bank queried at 224 px answered "background 100%" without a word."""
    query = generate_scene(np.random.default_rng(9), size=(112, 112), num_classes=4)[0]
    for call in (segment, novelty):
        with pytest.raises(BankError) as info:
            call(colour_backend, query, bank_112, size=size)
        message = str(info.value)
        assert "112 (shorter side)" in message and shown(size) in message
        assert "allow_size_mismatch=True" in message and "--allow-size-mismatch" in message
    assert segment(colour_backend, query, bank_112, size=size, allow_size_mismatch=True).mask.shape == (112, 112)
    assert segment(colour_backend, query, bank_112, size=112).input_size == (112, 112)  # the bank's own: fine


def test_support_pairs_without_a_size_use_their_images_own_size(colour_backend) -> None:
    """Regression: a bank built on the fly used 448 for 112-px pairs (16x the patches, worse matches)."""
    rng = np.random.default_rng(4)
    pairs = [generate_scene(rng, size=(112, 140), num_classes=4) for _ in range(2)]
    result = segment(colour_backend, pairs[0][0], pairs)
    assert result.input_size == (112, 140)
    assert support_size(pairs) == 112 and support_size(iter(pairs)) == 448  # a one-pass iterable: the default
    big = [(np.zeros((600, 900, 3), np.uint8), np.zeros((600, 900), np.uint8))]
    assert support_size(big) == 448  # never more than the default


def test_the_client_does_not_impose_its_size_on_support_pairs(monkeypatch) -> None:
    """Regression: `NecoClient().segment(q, pairs)` built the bank at the client's default 448."""
    import neco.client.triton as triton

    seen: list[dict] = []
    monkeypatch.setattr(triton, "segment", lambda backend, image, support, **options: seen.append(options))
    monkeypatch.setattr(triton, "novelty", lambda backend, image, support, **options: seen.append(options))
    client = object.__new__(triton.NecoClient)
    client.size = 448
    client.segment("q.png", [("a.png", "a_mask.png")])
    client.novelty("q.png", [("a.png", "a_mask.png")])
    assert seen == [{}, {}]


def test_the_cli_refuses_a_size_mismatch_in_one_line(colour_backend, bank_112, tmp_path, monkeypatch, capsys) -> None:
    import contextlib

    import neco.client.cli as client_cli
    from neco.client.retrieval import segment as real_segment

    bank_112.save(tmp_path / "bank")
    query = tmp_path / "q.png"
    Image.fromarray(generate_scene(np.random.default_rng(9), size=(112, 112), num_classes=4)[0]).save(query)
    colour_backend.segment = lambda image, support, **options: real_segment(colour_backend, image, support, **options)
    monkeypatch.setattr(client_cli, "_client", lambda args: contextlib.nullcontext(colour_backend))
    argv = ["segment", str(query), "--bank", str(tmp_path / "bank"), "--out", str(tmp_path / "m.png"), "--size", "224"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "224 (shorter side)" in err and "--allow-size-mismatch" in err
    assert main([*argv, "--allow-size-mismatch"]) == 0 and (tmp_path / "m.png").is_file()
    assert "encoder input 224x224" in capsys.readouterr().out


def test_eval_results_state_the_size_the_encoder_ran_at() -> None:
    """Regression: `--input-size 100` printed and wrote `input_size: 100`; the encoder ran at 98."""
    pytest.importorskip("neco.evaluation.config")
    from neco.config import load_config
    from neco.evaluation.hummingbird import HummingbirdConfig

    class Split(list):
        split = "train"

    cfg = load_config(HummingbirdConfig, None, ["data_root=data", "input_size=100"])
    cfg.fit_to(ModelContract.for_arch(ARCH))  # patch 14: the side the encoder runs at
    assert cfg.input_size == 98 and cfg.size == (98, 98)
    assert cfg.size_text.startswith("98x98 (input_size 100 rounded down")
    header = cfg.report_header("hummingbird", Split(), Split(), ModelContract.for_arch(ARCH))
    assert header["input_size"] == 98 and header["input_size_asked"] == 100 and header["config"]["input_size"] == 98
    assert "input_size_asked" not in load_config(HummingbirdConfig, None, ["data_root=data"]).report_header(
        "hummingbird", Split(), Split(), ModelContract.for_arch(ARCH)
    )


def test_segment_writes_the_overlay_alone_and_needs_one_output(
    colour_backend, bank_112, tmp_path, monkeypatch, capsys
) -> None:
    """Regression: `neco segment` required --out even when only --overlay was wanted."""
    import contextlib

    import neco.client.cli as client_cli
    from neco.client.retrieval import segment as real_segment

    bank_112.save(tmp_path / "bank")
    query = tmp_path / "q.png"
    Image.fromarray(generate_scene(np.random.default_rng(9), size=(112, 112), num_classes=4)[0]).save(query)
    colour_backend.segment = lambda image, support, **options: real_segment(colour_backend, image, support, **options)
    monkeypatch.setattr(client_cli, "_client", lambda args: contextlib.nullcontext(colour_backend))
    argv = ["segment", str(query), "--bank", str(tmp_path / "bank")]
    assert main([*argv, "--overlay", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").is_file() and not (tmp_path / "m.png").exists()
    assert f"-> {tmp_path / 'o.png'} (" in capsys.readouterr().out
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("--out (the mask), --overlay (the picture) or both: give one")


def test_bank_build_without_a_size_uses_the_support_images_own(colour_backend, tmp_path, monkeypatch, capsys) -> None:
    """Regression: `neco bank build` of 112-px scenes without --size built at 448 (16x the patches)."""
    import contextlib

    import neco.client.cli as client_cli
    from neco.scenes import write_scene_dataset

    root = write_scene_dataset(tmp_path / "scenes", {"train": 2}, size=(112, 112))
    monkeypatch.setattr(client_cli, "_client", lambda args: contextlib.nullcontext(colour_backend))
    assert main(["bank", "build", str(root / "train"), "--out", str(tmp_path / "bank")]) == 0
    assert "input size 112 (shorter side)" in capsys.readouterr().out
    assert MemoryBank.load(tmp_path / "bank").image_size == 112


def test_a_bank_warning_points_at_the_line_that_asked_for_the_segmentation(colour_backend, scenes_224) -> None:
    """Regression: the inferred-classes warning of a bank built by segment() named a line inside the client."""
    with pytest.warns(UserWarning, match="no class list") as record:
        line = inspect.currentframe().f_lineno + 1
        segment(colour_backend, scenes_224[0][0], scenes_224[:2])
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_memory_bank_build_without_a_size_uses_the_support_images_own(colour_backend, tmp_path) -> None:
    """Regression: `MemoryBank.build(client, folder)` built 112-px scenes at 448 (16x the patches)."""
    from neco.scenes import write_scene_dataset

    root = write_scene_dataset(tmp_path / "scenes", {"train": 2}, size=(112, 112))
    assert MemoryBank.build(colour_backend, root / "train").image_size == 112
    assert MemoryBank.build(colour_backend, root / "train", image_size=224).image_size == 224
