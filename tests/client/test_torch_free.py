"""The client must work with only its light dependencies: no torch, onnxruntime or PyTriton."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import FORBIDDEN

ALLOWED_ROOTS = {
    "numpy": (),
    "pillow": (),
    "pydantic": (),
    "pyyaml": (),
    "tqdm": (),
    "tritonclient": ("grpc",),
    "geventhttpclient": (),  # the client-http extra: tritonclient.http without tritonclient[http]'s aiohttp
    "greenlet": (),
    "faiss-cpu": (),
    "neco-dense": (),
}
"""The client and client-http extras' packages (and this project's own torch-free core)."""
RUNTIME_ARTEFACTS = {"cython_runtime", "swig_runtime_data5"}  # pseudo-modules made by compiled extensions


def allowed_distributions() -> set[str]:
    """The allowed roots plus everything they (with the chosen extras) require, transitively."""
    seen: set[str] = set()
    todo = [(name, frozenset(extras)) for name, extras in ALLOWED_ROOTS.items()]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if f"{key}{sorted(extras)}" in seen:
            continue
        seen.add(f"{key}{sorted(extras)}")
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
                todo.append((req.name, frozenset(req.extras)))
    return {entry.split("[")[0] for entry in seen}


def imported_distributions(modules: list[str]) -> dict[str, list[str]]:
    owners = metadata.packages_distributions()
    result = {}
    for module in modules:
        if module in sys.stdlib_module_names or module.startswith("_") or module in RUNTIME_ARTEFACTS:
            continue
        result[module] = [canonicalize_name(d) for d in owners.get(module, ["<unknown>"])]
    return result


def test_client_runs_with_heavy_packages_unimportable() -> None:
    """Block the heavy packages at import time, build a bank, segment, novelty, save/load, draw; then
    check that every module loaded belongs to the allowed packages or their dependencies."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        FORBIDDEN = {FORBIDDEN!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in FORBIDDEN:
                    raise ImportError(f"{{name}} is forbidden in the client")
                return None

        sys.meta_path.insert(0, Block())
        import tempfile
        import numpy as np
        import tritonclient.grpc, tritonclient.http  # what NecoClient loads for each protocol
        import neco.client, neco.client.cli
        from neco.client import MemoryBank, features_to_rgb, novelty, segment
        from neco.client.novelty import NoveltySpec
        from neco.contract import ModelContract
        from neco.scenes import generate_scene

        class Backend:
            contract = ModelContract.for_arch("vit_small_patch14_dinov2")
            def features(self, images):
                x = np.stack(images).astype(np.float32).reshape(len(images), 8, 14, 8, 14, 3).mean(axis=(2, 4))
                x = np.concatenate([x, np.zeros(x.shape[:3] + (381,), np.float32) + 1], -1)
                return x / np.linalg.norm(x, axis=-1, keepdims=True)

        pairs = [generate_scene(np.random.default_rng(0), size=(112, 112)) for _ in range(2)]
        bank = MemoryBank.build(Backend(), pairs, image_size=112, dtype="float16", novelty=NoveltySpec(dim=2))
        with tempfile.TemporaryDirectory() as tmp:
            bank.save(tmp + "/bank")
            result = segment(Backend(), pairs[0][0], tmp + "/bank")
            novelty(Backend(), pairs[0][0], tmp + "/bank").overlay(pairs[0][0])
        result.overlay(pairs[0][0])
        features_to_rgb(Backend().features([pairs[0][0]])[0])
        print(json.dumps({{"shape": result.mask.shape, "modules": sorted({{m.split(".")[0] for m in sys.modules}})}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [112, 112]
    assert not set(report["modules"]) & set(FORBIDDEN)
    allowed = allowed_distributions()
    outside = {m: d for m, d in imported_distributions(report["modules"]).items() if not set(d) & allowed}
    assert not outside, f"modules outside the client's dependencies: {outside}"


def test_cli_help_is_torch_free() -> None:
    script = (
        "import sys, contextlib, io\n"
        "from neco.client.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['segment', '--help'])\n"
        "    except SystemExit: pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_http_without_the_client_http_extra_names_the_extra(monkeypatch) -> None:
    """gRPC is the client extra's protocol; HTTP needs `client-http` and says so, before any request."""
    import sys

    from neco.client import NecoClient
    from neco.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "tritonclient.http", None)  # as if geventhttpclient were not installed
    with pytest.raises(MissingExtraError, match=r"install the `client-http` extra"):
        NecoClient("127.0.0.1:9", protocol="http", timeout_s=1)
