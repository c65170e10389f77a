"""What the client commands tell a user: missing banks, progress, where outputs go, the input size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neco.client import MemoryBank, segment
from neco.client.errors import BankError


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
    assert segment(colour_backend, image, bank, size=(56, 56)).input_size == (56, 56)


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
