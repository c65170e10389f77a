"""An AST scan of all project code for unsafe deserialisation and shell use (issue 14, security).

Fails on: `torch.load` without `weights_only=True`, any `pickle` import or use, `yaml.load`
without a safe loader, `allow_pickle=True`, `shell=True`. A probe proves each rule fires.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("core", "model", "training", "export", "serving", "client", "evaluation", "demo", "benchmarks")
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def findings(source: str, name: str) -> list[str]:
    """`name:line: rule` for every unsafe construct in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] in ("pickle", "cPickle", "dill") for a in node.names
        ):
            found.append(f"{name}:{line}: pickle import")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "cPickle", "dill"):
            found.append(f"{name}:{line}: pickle import")
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        if func == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{name}:{line}: torch.load without weights_only=True")
        if func.startswith("pickle."):
            found.append(f"{name}:{line}: pickle use")
        if func == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{name}:{line}: yaml.load without a safe loader")
        if _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{name}:{line}: allow_pickle=True")
        if _is_true(_keyword(node, "shell")):
            found.append(f"{name}:{line}: shell=True")
    return found


def project_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)


def test_project_code_has_no_unsafe_deserialisation_or_shell():
    files = project_files()
    assert len(files) > 50, "the scan must see the whole project"
    problems = [f for path in files for f in findings(path.read_text(), str(path.relative_to(REPO)))]
    assert problems == []


PROBES = {
    "import pickle": "pickle import",
    "from pickle import loads": "pickle import",
    "import dill": "pickle import",
    "pickle.loads(b'')": "pickle use",
    "torch.load('w.pt')": "torch.load without weights_only=True",
    "torch.load('w.pt', weights_only=False)": "torch.load without weights_only=True",
    "yaml.load(text)": "yaml.load without a safe loader",
    "yaml.load(text, Loader=yaml.FullLoader)": "yaml.load without a safe loader",
    "numpy.load('a.npy', allow_pickle=True)": "allow_pickle=True",
    "subprocess.run('ls', shell=True)": "shell=True",
}


@pytest.mark.parametrize("snippet", list(PROBES))
def test_scan_catches_each_rule(snippet):
    assert findings(snippet, "probe") == [f"probe:1: {PROBES[snippet]}"]


@pytest.mark.parametrize(
    "snippet",
    ["torch.load('w.pt', weights_only=True)", "yaml.load(t, Loader=yaml.SafeLoader)", "yaml.safe_load(t)",
     "subprocess.run(['ls'], shell=False)", "numpy.load('a.npy')"],
)  # fmt: skip
def test_scan_accepts_the_safe_forms(snippet):
    assert findings(snippet, "probe") == []
