"""One NGC release everywhere: compose, the prepare image, Kubernetes and the pages name the same `YY.MM`.

A TensorRT plan deserialises only in the TensorRT that built it, so the image that builds it
(`nvcr.io/nvidia/tensorrt:YY.MM-py3`) and the Triton that serves it (`tritonserver:YY.MM-py3`)
must come from one release; and a page that names another release sends a reader to the wrong
image. The release is read from docker-compose.yml and every other place is checked against it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
NGC_IMAGE = re.compile(r"nvcr\.io/nvidia/(tritonserver|tensorrt):(\d\d\.\d\d)")
OLDEST_ALLOWED = "26.02"
"""The first release of the 26.xx line (Python 3.12, CUDA 13, compute capability >= 7.5)."""


def compose_release() -> str:
    compose = (REPO / "docker-compose.yml").read_text()
    match = re.search(r"NECO_TRITON_IMAGE:-nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", compose)
    assert match, "docker-compose.yml has no default NECO_TRITON_IMAGE"
    return match.group(1)


def files_naming_images() -> list[Path]:
    pages = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]
    deploy = sorted(p for p in (REPO / "deploy").rglob("*") if p.is_file())
    return [REPO / "docker-compose.yml", REPO / "serving" / "Dockerfile", *deploy, *pages]


def test_the_release_is_of_the_26_line():
    assert compose_release() >= OLDEST_ALLOWED


def test_compose_the_dockerfile_kubernetes_and_pages_name_one_release():
    release = compose_release()
    others = {
        f"{path.relative_to(REPO)}: {kind}:{found}"
        for path in files_naming_images()
        for kind, found in NGC_IMAGE.findall(path.read_text(errors="replace"))
        if found != release
    }
    assert not others, f"not the compose release {release}: {sorted(others)}"
    dockerfile = (REPO / "serving" / "Dockerfile").read_text()
    assert f"ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:{release}-py3" in dockerfile


def test_the_kubernetes_base_pins_the_compose_release():
    kustomization = yaml.safe_load((REPO / "deploy" / "kubernetes" / "base" / "kustomization.yaml").read_text())
    tags = {image["name"]: image.get("newTag") for image in kustomization["images"]}
    assert tags["nvcr.io/nvidia/tritonserver"] == f"{compose_release()}-py3"


def test_the_version_table_describes_the_release_the_files_run():
    """docs/tensorrt.md holds the release's versions once; its heading and images are the compose release."""
    page = (REPO / "docs" / "tensorrt.md").read_text()
    release = compose_release()
    assert f"### The release this project runs: {release}" in page
    section = page.split(f"### The release this project runs: {release}", 1)[1].split("\n## ", 1)[0]
    assert f"tritonserver:{release}-py3" in section and f"tensorrt:{release}-py3" in section
    for row in ("| Triton Inference Server |", "| TensorRT |", "| onnxruntime backend |", "| Python | 3.12"):
        assert row in section, row
    for page_name in ("serving.md", "scaling.md"):  # the other pages link to the table instead of repeating it
        assert "tensorrt.md#the-release-this-project-runs-" in (REPO / "docs" / page_name).read_text(), page_name
