"""The sorter benchmark runs end to end on a tiny input and writes a schema-conforming file."""

import json
from pathlib import Path

import sorter
import torch

from .test_results_schema import check_schema


def test_sorter_main_writes_the_common_schema(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sorter_cpu.json"
    assert sorter.main(["--rows", "8", "--repeats", "2", "--no-reference", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    check_schema(document)
    assert document["benchmark"] == "sorter"
    assert document["settings"]["rows"] == [8] and document["settings"]["n"] == sorter.N
    assert document["settings"]["ref_repeats"] is None  # --no-reference
    (row,) = document["results"]
    assert row["rows"] == 8 and "diffsort" not in row
    assert len(row["ours"]["times_s"]) == 2 and row["ours"]["median_s"] > 0
    assert isinstance(row["ours"]["peak_bytes"], int) and row["ours"]["peak_bytes"] > 0  # from the child process
    assert document["machine"]["torch_threads"] == torch.get_num_threads()
    assert "ours" in capsys.readouterr().out  # the printed table is still there
