"""Every package folder of the distribution reaches every place that installs it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
    assert package_folders() <= copied, sorted(package_folders() - copied)
