"""The import rules of ARCHITECTURE.md, checked by import-linter over the real code.

import-linter (grimp) discovers the sub-modules of a root package by walking its folder, but
this distribution maps `neco.training` etc. from top-level folders (setuptools `package-dir`),
which no folder walk can see. So the test lays the files out as the installed namespace
(`neco/training/...`) in a temporary folder, points PYTHONPATH at it and runs `lint-imports`
with the contracts from pyproject.toml unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_namespace_tree(target: Path) -> Path:
    """Copy every mapped package folder's .py files to `target/<dotted path>/`."""
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools_cfg["package-dir"].items():
        destination = target.joinpath(*package.split("."))
        destination.mkdir(parents=True, exist_ok=True)
        for source in (REPO / folder).glob("*.py"):
            shutil.copy2(source, destination / source.name)
    return target


def test_import_contracts_hold(tmp_path: Path) -> None:
    tree = build_namespace_tree(tmp_path / "src")
    assert sorted(p.name for p in (tree / "neco").iterdir() if p.is_dir()) == [
        "app",
        "client",
        "configs",  # package data (the shipped YAML), no imports
        "demo",
        "evaluation",
        "export",
        "model",
        "serving",
        "training",
    ]
    lint_imports = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(
        [str(lint_imports), str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_broken_rule_is_reported(tmp_path: Path) -> None:
    """The check is not vacuous: a client module importing torch breaks a contract."""
    tree = build_namespace_tree(tmp_path / "src")
    (tree / "neco" / "client" / "offender.py").write_text("import torch\n")
    (tree / "neco" / "client" / "__init__.py").write_text("from . import offender\n")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "neco.client.offender -> torch" in result.stdout
