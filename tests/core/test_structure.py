"""Structural rules of the code base: no import cycles inside a stage, one error hierarchy.

Both walk the real modules as the installed namespace lays them out (`neco/<stage>/...`, built
by `build_namespace_tree`, since `package-dir` maps stages from top-level folders).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from neco.errors import NecoError
from tests.core.test_import_rules import REPO, build_namespace_tree

CYCLE_PROBE = """
import json, sys
import grimp

graph = grimp.build_graph("neco", exclude_type_checking_imports=False, cache_dir=None)
edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
print(json.dumps(edges))
"""


def stage_of(module: str) -> str:
    """`neco.client.bank` -> `neco.client`; a core module (`neco.contract`) -> `neco`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else "neco"


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan's way."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, []):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def stage_edges(edges: dict[str, list[str]]) -> dict[str, list[str]]:
    """Only the imports that stay inside one stage (cross-stage rules are import-linter's)."""
    return {m: [t for t in targets if stage_of(t) == stage_of(m)] for m, targets in edges.items()}


def test_the_cycle_finder_finds_a_cycle() -> None:
    """Not vacuous: a three-module circle (as a TYPE_CHECKING import would make) is found, a chain is not."""
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": ["c"], "c": []}) == []


def test_no_import_cycle_inside_any_stage(tmp_path: Path) -> None:
    tree = build_namespace_tree(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-c", CYCLE_PROBE],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    edges = json.loads(result.stdout)
    assert "neco.client.bank" in edges and "neco.serving.gateway" in edges  # the whole tree was read
    found = cycles(stage_edges(edges))
    assert not found, found


def defined_modules() -> list[str]:
    """Every module of the distribution, by its installed dotted name (`__main__` modules left out: they run)."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    names = []
    for package, folder in package_dir.items():
        for source in sorted((REPO / folder).glob("*.py")):
            if source.stem != "__main__":
                names.append(package if source.stem == "__init__" else f"{package}.{source.stem}")
    return names


def test_every_exception_class_derives_from_neco_error() -> None:
    offenders = []
    for name in defined_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and not issubclass(cls, NecoError):
                offenders.append(f"{name}.{cls.__qualname__}")
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["neco.errors", "neco.client.errors"])
def test_the_module_walk_sees_the_error_modules(name: str) -> None:
    assert name in defined_modules()


def project_sources() -> list[Path]:
    """Every Python file of the mapped packages and the benchmarks (tests keep pytest's `from .conftest`)."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folders = [*package_dir.values(), "benchmarks"]
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def test_one_import_style_and_only_the_clients_public_names_outside_it() -> None:
    """Absolute `neco.*` imports everywhere; other stages use `neco.client` and its modules' public
    names, never its command line (`neco.client.cli`) or a private name."""
    offenders = []
    for source in project_sources():
        where = source.relative_to(REPO)
        inside_client = where.parts[0] == "client"
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            names = [alias.name for alias in node.names]
            if node.level > 0:
                offenders.append(f"{where}: relative import from {'.' * node.level}{node.module or ''}")
            elif (node.module or "").startswith("neco.client") and not inside_client:
                if node.module == "neco.client.cli" or any(n.startswith("_") for n in names):
                    offenders.append(f"{where}: from {node.module} import {', '.join(names)}")
    assert not offenders, offenders


def test_the_client_exports_a_small_public_api() -> None:
    import neco.client

    assert len(neco.client.__all__) <= 25
    assert all(hasattr(neco.client, name) for name in neco.client.__all__)


def test_names_imported_from_the_client_package_are_its_public_api() -> None:
    """`from neco.client import X` only for X in `__all__`; everything else comes from its module."""
    import neco.client

    offenders = []
    for source in [*project_sources(), *sorted((REPO / "tests").rglob("*.py"))]:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "neco.client" and node.level == 0:
                extra = [alias.name for alias in node.names if alias.name not in neco.client.__all__]
                if extra:
                    offenders.append(f"{source.relative_to(REPO)}: {', '.join(extra)}")
    assert not offenders, offenders
