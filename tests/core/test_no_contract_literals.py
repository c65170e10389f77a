"""No stage spells the contract itself: tensor names, dtypes, patch size, mean/std and the
repository/dataset file names are written only in the core (`core/`, the package `neco`).

An AST scan (not a text grep) over the stage folders and benchmarks: docstrings and comments
may mention the names; code may not contain them as literals. A literal that reappears in a
stage is a second definition that can drift from the contract.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGE_FOLDERS = ("model", "training", "export", "serving", "client", "evaluation", "demo", "benchmarks")

NAMES = {"images", "features", "features_raw", "cls_token"}
DTYPES = {"UINT8", "FP32", "TYPE_UINT8", "TYPE_FP32", "tensor(uint8)", "tensor(float)"}
FILES = ("config.pbtxt", "model.onnx", "model.plan", "classes.json")
NUMBERS = {14, 0.485, 0.456, 0.406, 0.229, 0.224, 0.225}

# The same word meaning something else; each entry says what.
ALLOWED = {
    ("model/backbone.py", "cls_token"): "timm's parameter name in a state dict, not the served output",
    ("training/optim.py", "cls_token"): "timm's parameter name (no weight decay), not the served output",
    ("client/bank.py", "images"): "the manifest's count of support images, not the served input",
    (
        "evaluation/datasets.py",
        "images",
    ): "ADE20k's and COCO-Stuff's own folder names (ADEChallengeData2016/images, cocostuff/images)",
    ("client/cli.py", "features"): "the name of the `neco features` sub-command",
}


def _docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # attribute docstrings
            found.add(id(node.value))
    return found


def contract_literals(path: Path) -> list[str]:
    """`file:line: literal` for every contract literal in code (not docstrings) of `path`.

    An integer inside a literal table (tuple/list/set/dict display, e.g. a class-id mapping)
    is data, not a patch size; floats are flagged everywhere.
    """
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstring_nodes(tree)
    in_table = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict))
        for child in ast.iter_child_nodes(node)
    }
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docstrings:
            continue
        if isinstance(node.value, int) and id(node) in in_table:
            continue
        value = node.value
        if isinstance(value, bool):
            continue
        path_like = isinstance(value, str) and not any(c.isspace() for c in value)  # prose may name files
        bad = (
            (isinstance(value, str) and (value in NAMES or value in DTYPES))
            or (path_like and any(f in value for f in FILES))
            or (isinstance(value, (int, float)) and value in NUMBERS)
        )
        if bad and (str(path.relative_to(REPO)), value) not in ALLOWED:
            hits.append(f"{path.relative_to(REPO)}:{node.lineno}: {value!r}")
    return hits


def test_the_scan_finds_literals(tmp_path: Path) -> None:
    sample = REPO / "benchmarks" / "_literal_probe_test.py"
    sample.write_text(
        '"""doc mentions images and config.pbtxt."""\n'
        'x = {"images": 1, "p": "a/model.onnx"}\ny = h // 14\ntable = (3, 14)\nstd = (0.229, 0.3)\n'
    )
    try:
        assert sorted(contract_literals(sample)) == [
            "benchmarks/_literal_probe_test.py:2: 'a/model.onnx'",
            "benchmarks/_literal_probe_test.py:2: 'images'",
            "benchmarks/_literal_probe_test.py:3: 14",
            "benchmarks/_literal_probe_test.py:5: 0.229",
        ]
    finally:
        sample.unlink()


@pytest.mark.parametrize("folder", STAGE_FOLDERS)
def test_no_contract_literal_outside_the_core(folder: str) -> None:
    hits = [hit for path in sorted((REPO / folder).rglob("*.py")) for hit in contract_literals(path)]
    assert not hits, "contract literals outside core/ (import them from neco.contract / neco.signature):\n" + "\n".join(
        hits
    )
