"""Every benchmark result file has the one schema of `benchmarks/common.py`, so one reader loads them all."""

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from common import RESULT_KEYS, RESULTS_DIR, SCHEMA, machine_info, make_result, write_result

BENCHMARKS = RESULTS_DIR.parent
RESULT_FILES = sorted(RESULTS_DIR.glob("*.json"))


def check_schema(document: dict[str, Any]) -> None:
    """The checks a reader relies on: exact keys in order, and the type of each."""
    assert tuple(document) == RESULT_KEYS
    assert document["schema"] == SCHEMA
    assert isinstance(document["benchmark"], str) and document["benchmark"]
    assert datetime.fromisoformat(document["created"]).tzinfo is not None
    machine = document["machine"]
    assert isinstance(machine, dict)
    assert {"cpu", "cpu_count", "python"} <= set(machine)
    assert machine["cpu"] is None or isinstance(machine["cpu"], str)  # None: not recorded by an old run
    assert machine["cpu_count"] is None or isinstance(machine["cpu_count"], int)
    assert isinstance(machine["python"], str)
    assert isinstance(document["settings"], dict)
    assert isinstance(document["results"], (list, dict)) and document["results"]
    goal = document["goal"]
    assert goal is None or (isinstance(goal, dict) and isinstance(goal["met"], bool))


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_committed_result_has_the_schema(path: Path) -> None:
    document = json.loads(path.read_text())
    check_schema(document)
    assert path.stem.startswith(f"{document['benchmark']}_")  # <benchmark>_<device>[_variant].json


def test_every_benchmark_has_a_committed_result() -> None:
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - {"common"}
    assert {json.loads(p.read_text())["benchmark"] for p in RESULT_FILES} == scripts


def test_machine_info_describes_this_machine() -> None:
    machine = machine_info()
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    assert machine["cpu_count"] >= 1 and len(machine["load_average_1_5_15min"]) == 3
    assert machine["packages"]["numpy"] is not None


def test_make_and_write_result_round_trip(tmp_path: Path) -> None:
    document = make_result("demo", {"rows": 3}, [{"x": 1.5}], goal={"target": 2, "met": False}, machine={"cpu": "x"})
    path = write_result(document, tmp_path / "sub" / "demo_cpu.json")
    assert json.loads(path.read_text()) == document
    assert document["goal"] == {"target": 2, "met": False} and document["machine"] == {"cpu": "x"}
    assert [p.name for p in path.parent.iterdir()] == ["demo_cpu.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("goal"),
        lambda d: d.update(extra=1),
        lambda d: d.update(schema="neco-benchmark/0"),
        lambda d: d.update(machine=d.pop("machine")),  # same keys, wrong order
    ],
    ids=["missing-key", "extra-key", "wrong-schema", "wrong-order"],
)
def test_write_result_rejects_another_schema(tmp_path: Path, change) -> None:
    document = make_result("demo", {}, [], machine={})
    change(document)
    with pytest.raises(ValueError, match="benchmark result must have keys"):
        write_result(document, tmp_path / "bad.json")
    assert not list(tmp_path.iterdir())
