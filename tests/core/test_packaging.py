"""Every package folder of the distribution reaches every place that installs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def package_folders() -> set[str]:
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools_cfg["package-dir"].values())


def test_every_package_folder_exists_and_is_listed():
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools_cfg["packages"]) == set(setuptools_cfg["package-dir"])
    for folder in package_folders():
        assert (REPO / folder / "__init__.py").is_file(), folder


def test_the_prepare_image_copies_every_package_folder():
    """`pip install .` inside serving/Dockerfile fails if a package-dir folder is not copied."""
    dockerfile = (REPO / "serving" / "Dockerfile").read_text()
    copied = {Path(source).name for source in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M)}
    missing = {folder for folder in package_folders() if Path(folder).parts[0] not in copied}  # COPY is recursive
    assert not missing, sorted(missing)


def test_the_docker_build_context_holds_every_copied_file():
    """BuildKit sends only what serving/Dockerfile.dockerignore re-includes; a COPY of anything else fails."""
    dockerfile = (REPO / "serving" / "Dockerfile").read_text()
    copied = {source for line in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M) for source in line.split()}
    rules = [
        line for line in (REPO / "serving" / "Dockerfile.dockerignore").read_text().splitlines() if line[:1] != "#"
    ]
    assert rules[0] == "*"
    included = {rule[1:].removesuffix("/**") for rule in rules if rule.startswith("!")}
    assert copied <= included, sorted(copied - included)
    assert "constraints.txt" in copied  # the image installs with the project's pins


IGNORED_IN_COPY = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "outputs", "demo_output", "model_repository",
    ".pytest_cache", ".hypothesis",
)  # fmt: skip


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`make wheel` from a copy of the checkout, installed with `pip --target`; (wheel, target folder).

    Built offline (the dev extra's setuptools + wheel, no build isolation). The copy stands for
    a read-only checkout: root ignores permission bits, so instead nothing may change in it.
    """
    base = tmp_path_factory.mktemp("wheel")
    source, wheels, target = base / "neco", base / "wheels", base / "site"
    shutil.copytree(REPO, source, ignore=IGNORED_IN_COPY)
    before = tree_state(source)
    make = subprocess.run(
        ["make", "-s", "-C", str(source), "wheel", f"WHEEL_DIR={wheels}", "WHEEL_FLAGS=--no-build-isolation",
         f"WHEEL_PYTHON={sys.executable}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert make.returncode == 0, make.stderr
    assert tree_state(source) == before, "make wheel wrote into the source tree"
    (wheel,) = wheels.glob("neco_dense-*-py3-none-any.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    return wheel, target


@pytest.mark.slow  # the module's wheel build: ~25 s on an idle 2-core machine
def test_wheel_ships_every_config_as_package_data(installed_wheel):
    wheel, _ = installed_wheel
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped = {n for n in names if n.startswith("neco/configs/") and n.endswith(".yaml")}
        assert shipped == {f"neco/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
        assert archive.read("neco/configs/demo.yaml") == (REPO / "configs" / "demo.yaml").read_bytes()
        assert not any(n.startswith(("tests/", "configs/")) for n in names)


def run_installed(target: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """The installed console script, from a folder without configs/, importing only the install.

    `-I` leaves out the checkout (cwd, PYTHONPATH, user site); the installed wheel comes first.
    """
    bootstrap = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import neco; "
        f"assert neco.__file__.startswith({str(target)!r}), neco.__file__; "
        "from neco.cli import main; sys.argv[0] = 'neco'; raise SystemExit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-I", "-c", bootstrap, *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_installed_wheel_runs_from_another_folder_with_its_configs(installed_wheel, tmp_path):
    _, target = installed_wheel
    assert (target / "bin" / "neco").is_file()  # the console script
    version = run_installed(target, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip() == "neco 0.1.0", version.stderr
    # configs/serve_cpu.yaml, as the README writes it, resolves from the package, not the cwd
    for name in ("configs/serve_cpu.yaml", "serve_cpu"):
        served = run_installed(target, tmp_path, "serve", "--config", name, "--repository", str(tmp_path / "absent"))
        assert served.returncode == 2, served.stderr
        assert "model repository" in served.stderr and "does not exist" in served.stderr, served.stderr
    missing = run_installed(target, tmp_path, "serve", "--config", "configs/nope.yaml")
    assert missing.returncode == 2 and "'configs/nope.yaml' does not exist" in missing.stderr
    assert "serve_cpu" in missing.stderr  # the message lists the shipped names


def test_the_image_installs_with_the_project_pins_unchanged():
    """serving/Dockerfile installs with constraints.txt as is: its base image's Python 3.12 has a wheel for every pin."""
    dockerfile = (REPO / "serving" / "Dockerfile").read_text()
    assert '-c constraints.txt ".[export,gateway]"' in dockerfile
    assert not list((REPO / "serving").glob("constraints*.txt"))  # no replacement pins to keep in step


@pytest.mark.slow
def test_the_checkout_root_does_not_shadow_the_installed_package(installed_wheel):
    """A script run from the checkout root imports the installed `neco`, stages included.

    `python -c` puts the working directory first on sys.path; a core folder named `neco/` there
    would be imported instead of the installed package, and `neco.client` would not exist.
    """
    _, target = installed_wheel
    probe = "import neco, neco.client; print(neco.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target)), result.stdout
