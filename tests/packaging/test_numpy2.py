"""The client lives beside numpy 2 (issue 31 item 3): only the `serve` extra caps numpy, and CI proves it.

`make test-client-numpy2` (a prerequisite of `make test`) builds the client-only environment and runs
the client's tests there; these tests keep the declarations that make that possible from drifting.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.client.conftest import FORBIDDEN
from tests.packaging.client_only import needs_server

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SELF = canonicalize_name(PROJECT["name"])


def pins(name: str) -> dict[str, str]:
    """`package -> version` of a constraints file (canonical names)."""
    lines = (REPO / name).read_text().splitlines()
    return {
        canonicalize_name(left): right
        for left, right in (line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    }


NUMPY_2 = pins("constraints-numpy2.txt")["numpy"]


def closure(extras: set[str]) -> list[Requirement]:
    """The base requirements plus those of `extras`, following this project's own `neco-dense[...]` entries."""
    todo, seen, found = list(extras), set(), [Requirement(text) for text in PROJECT["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in map(Requirement, PROJECT["optional-dependencies"][extra]):
            if canonicalize_name(req.name) == SELF:
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


def refuses_numpy_2(requirements: list[Requirement]) -> bool:
    return any(req.name == "numpy" and not req.specifier.contains(NUMPY_2) for req in requirements)


def test_only_the_serve_extra_keeps_numpy_below_2() -> None:
    """nvidia-pytriton pins numpy<2; the base requirements used to, which made every app install numpy<2."""
    assert not refuses_numpy_2(closure(set()))
    capped = {extra for extra in PROJECT["optional-dependencies"] if refuses_numpy_2(closure({extra}))}
    assert capped == {"serve", "all"}  # `all` holds `serve`


def test_the_numpy2_constraints_differ_from_constraints_txt_only_in_numpy() -> None:
    numpy2, main = pins("constraints-numpy2.txt"), pins("constraints.txt")
    assert int(NUMPY_2.split(".")[0]) >= 2
    assert main["numpy"].startswith("1.")  # the main environment holds `serve`
    assert {name: version for name, version in numpy2.items() if main.get(name) != version} == {"numpy": NUMPY_2}
    assert not set(numpy2) & {canonicalize_name(name) for name in FORBIDDEN}


def test_the_client_extra_brings_one_protocol_and_http_is_an_extra_without_aiohttp() -> None:
    """gRPC by default; `client-http` adds tritonclient.http's geventhttpclient, never tritonclient[http]'s
    aiohttp (it serves only tritonclient.http.aio, which the client never imports)."""
    client = {canonicalize_name(req.name): req for req in closure({"client"})}
    http = {canonicalize_name(req.name): req for req in closure({"client-http"})}
    assert "geventhttpclient" not in client and "geventhttpclient" in http
    for names in (client, http):
        assert "aiohttp" not in names
        assert all("http" not in req.extras for req in names.values() if req.name == "tritonclient")


def test_make_test_runs_the_client_beside_numpy_2() -> None:
    """CI runs `make test` only (.ci/run); the numpy-2 environment is one of its prerequisites."""
    makefile = (REPO / "Makefile").read_text()
    prerequisites = re.search(r"^test:(.*)$", makefile, flags=re.M).group(1).split()
    assert "test-client-numpy2" in prerequisites
    assert re.search(r"^test-client-numpy2:", makefile, flags=re.M)
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    assert commands[-1] == "make test"


def test_server_tests_are_left_out_of_the_client_only_run() -> None:
    assert needs_server(SimpleNamespace(fixturenames=["tmp_path", "triton_server"]))
    assert needs_server(SimpleNamespace(fixturenames=["model_repository"]))
    assert not needs_server(SimpleNamespace(fixturenames=["tmp_path", "colour_backend"]))
