"""docs/reliability.md's table names only tests that exist."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_named_test_exists():
    rows = [line for line in (REPO / "docs/reliability.md").read_text().splitlines() if line.startswith("| ")]
    named = [row.rstrip(" |").rsplit("| ", 1)[1] for row in rows[2:]]
    ids = [n for n in named if "::" in n]
    assert len(ids) >= 8
    for test_id in ids:
        path, name = test_id.split("::")
        functions = {n.name for n in ast.walk(ast.parse((REPO / path).read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in functions, test_id
