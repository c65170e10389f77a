"""`neco app`: the web page's API with FastAPI's TestClient, then the page in a real headless browser.

The API tests run on the colour backend (no server); the browser test drives Debian's chromium
through selenium against uvicorn and the session's embedded Triton server, and checks the mask
the page offers for download against `NecoClient.segment` on the same inputs.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from packaging.requirements import Requirement
from PIL import Image

from neco.app.config import AppConfig
from neco.app.server import create_app
from neco.client import MemoryBank, segment
from neco.config import load_config
from neco.errors import MissingExtraError
from neco.scenes import SCENE_CLASSES, generate_scene
from tests.client.conftest import FORBIDDEN, ColourBackend

ROOT = Path(__file__).resolve().parents[2]
SIZE = 112
CLASSES = list(SCENE_CLASSES[:4])


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url_pixels(url: str) -> np.ndarray:
    head, _, payload = url.partition(",")
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))))


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [generate_scene(rng, size=(SIZE, SIZE), num_classes=4) for _ in range(4)]


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory, scenes) -> Path:
    """A bank root with two colour-backend banks, plus things that are not banks."""
    root = tmp_path_factory.mktemp("banks")
    backend = ColourBackend()
    MemoryBank.build(backend, scenes[:3], class_names=CLASSES, image_size=SIZE).save(root / "scenes")
    MemoryBank.build(backend, scenes[1:3], class_names=CLASSES, image_size=SIZE).save(root / "small.v2")
    (root / "not_a_bank").mkdir()
    (root / "notes.txt").write_text("not a bank either")
    outside = root.parent / f"{root.name}_outside"
    MemoryBank.build(backend, scenes[:1], class_names=CLASSES, image_size=SIZE).save(outside)
    (root / "linked").symlink_to(outside, target_is_directory=True)  # a real bank, but outside the root
    return root


@pytest.fixture
def api(banks: Path) -> TestClient:
    config = AppConfig(banks=banks, size=SIZE, max_upload_mb=0.25, max_unpacked_mb=0.5, max_support_images=3)
    return TestClient(create_app(config, ColourBackend))


def post(api: TestClient, query: bytes, name: str = "query.png", **data: str) -> tuple[int, dict]:
    response = api.post("/api/segment", data=data, files={"query": (name, query, "image/png")})
    return response.status_code, response.json()


def test_page_loads_with_its_form(api: TestClient) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="bank"', 'id="support"', 'id="canvas"', 'id="query"', 'id="size-mode"', 'id="run"'):
        assert element in page.text
    assert 'id="error"' in page.text and 'id="bank-download"' in page.text and 'src="paint.js"' in page.text
    scripts = [api.get("/paint.js"), api.get("/page.js")]
    for script in scripts:
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for served in (page.text, *(script.text for script in scripts)):  # everything comes from the app itself
        assert "http://" not in served and "https://" not in served and "//cdn" not in served
    settings = api.get("/api/config").json()
    assert settings["max_upload_bytes"] == 262144 and settings["max_support_images"] == 3
    assert len(settings["palette"]) == 10 and settings["max_queries"] == 16
    assert api.get("/nowhere").json() == {"error": "Not Found"}


def test_bank_listing_shows_only_saved_banks_inside_the_root(api: TestClient, banks: Path, tmp_path: Path) -> None:
    assert api.get("/api/banks").json() == {"root": str(banks), "banks": ["scenes", "small.v2"]}
    empty = TestClient(create_app(AppConfig(banks=tmp_path / "missing"), ColourBackend))
    assert empty.get("/api/banks").json()["banks"] == []


def test_saved_bank_result_equals_segment(api: TestClient, banks: Path, scenes) -> None:
    query = png(scenes[3][0])
    status, answer = post(api, query, bank="scenes", k="10", temperature="0.05")
    assert status == 200, answer
    result = answer["results"][0]
    expected = segment(ColourBackend(), query, banks / "scenes", k=10, temperature=0.05)
    mask = data_url_pixels(result["mask"])
    np.testing.assert_array_equal(mask, expected.mask)
    assert answer["bank"]["classes"] == CLASSES and answer["bank"]["label"] == "saved bank 'scenes'"
    assert result["size"] == [SIZE, SIZE] and result["grid"] == [8, 8] and result["input_size"] == [SIZE, SIZE]
    present, counts = np.unique(expected.mask, return_counts=True)
    assert [e["name"] for e in result["legend"]] == [CLASSES[c] for c in present]
    np.testing.assert_allclose([e["share"] for e in result["legend"]], counts / expected.mask.size)
    assert result["legend"][0]["colour"] == "#000000"  # class 0 of the palette the overlay uses
    for picture in ("query", "overlay", "confidence", "pca"):  # no legend or colour bar burned in: the page has one
        assert data_url_pixels(result[picture]).shape == (SIZE, SIZE, 3), picture
    np.testing.assert_array_equal(data_url_pixels(result["query"]), scenes[3][0])


def test_uploaded_support_loose_files_and_zip_equal_segment_on_pairs(api: TestClient, scenes) -> None:
    support, (query_image, _) = scenes[:2], scenes[3]
    query = png(query_image)
    expected = segment(ColourBackend(), query, support, class_names=CLASSES, size=SIZE).mask
    loose = [("support", (f"s{i}.png", png(image), "image/png")) for i, (image, _) in enumerate(support)]
    loose += [("support", (f"s{i}_mask.png", png(mask), "image/png")) for i, (_, mask) in enumerate(support)]
    response = api.post(
        "/api/segment", data={"classes": ", ".join(CLASSES)}, files=[("query", ("q.png", query, "image/png")), *loose]
    )
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(data_url_pixels(response.json()["results"][0]["mask"]), expected)
    assert response.json()["bank"]["label"] == "2 support images"

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:  # the support-folder layout under one top folder
        zf.writestr("set/classes.json", json.dumps(CLASSES))
        zf.writestr("__MACOSX/set/images/._0.png", b"resource fork")
        for i, (image, mask) in enumerate(support):
            zf.writestr(f"set/images/{i}.png", png(image))
            zf.writestr(f"set/masks/{i}.png", png(mask))
    response = api.post(
        "/api/segment",
        files=[
            ("query", ("q.png", query, "image/png")),
            ("support", ("set.zip", archive.getvalue(), "application/zip")),
        ],
    )
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(data_url_pixels(response.json()["results"][0]["mask"]), expected)
    assert response.json()["bank"]["classes"] == CLASSES


def test_upload_limits_answer_413_with_a_message(api: TestClient, scenes) -> None:
    big = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # ~480 KB as PNG
    status, answer = post(api, png(big), bank="scenes")
    assert status == 413 and "upload too large" in answer["error"] and "0.2 MiB (max_upload_mb)" in answer["error"]
    chunked = api.post(  # no Content-Length: the body is counted as it arrives
        "/api/segment", content=iter([b"x" * 100_000] * 4), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert chunked.status_code == 413 and "upload too large" in chunked.json()["error"]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images/a.png", b"\0" * 600_000)  # compresses to ~1 KB, unpacks beyond 0.5 MiB
    response = api.post(
        "/api/segment",
        files=[("query", ("q.png", png(scenes[0][0]), "image/png")), ("support", ("b.zip", bomb.getvalue(), "x"))],
    )
    assert response.status_code == 413 and "max_unpacked_mb" in response.json()["error"]
    many = [("support", (f"{i}.png", png(scenes[0][0]), "image/png")) for i in range(4)]
    many += [("support", (f"{i}_mask.png", png(scenes[0][1]), "image/png")) for i in range(4)]
    response = api.post("/api/segment", files=[("query", ("q.png", png(scenes[0][0]), "image/png")), *many])
    assert response.status_code == 413 and "at most 3" in response.json()["error"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([("query", ("broken.png", b"\x89PNG\r\n\x1a\n not really", "image/png"))], "query image 'broken.png'"),
        ([("query", ("empty.png", b"", "image/png"))], "query image 'empty.png': image bytes are empty"),
        ([("query", ("", b"", "application/octet-stream"))], "choose a query image"),  # an empty file input
        ([("support", ("a.png", "IMAGE", "image/png"))], "image 'a.png' has no mask"),
        (
            [("support", ("a.png", "IMAGE", "image/png")), ("support", ("a_mask.png", b"junk", "x"))],
            "support mask 'a_mask.png'",
        ),
        ([("support", ("a.zip", b"PK\x03\x04 truncated", "application/zip"))], "'a.zip' is not a readable zip"),
        ([("support", ("notes.txt", b"hello", "text/plain"))], "'notes.txt' is neither an image"),
        ([("support", ("classes.json", b"[1, 2]", "application/json"))], "non-empty JSON list"),
    ],
)
def test_bad_files_get_a_4xx_message_without_a_traceback(api: TestClient, scenes, files, message) -> None:
    image = png(scenes[0][0])
    files = [(field, (name, image if data == "IMAGE" else data, kind)) for field, (name, data, kind) in files]
    if not any(field == "query" for field, _ in files):
        files.append(("query", ("q.png", image, "image/png")))
    uploads_support = any(field == "support" for field, _ in files)
    response = api.post("/api/segment", data={} if uploads_support else {"bank": "scenes"}, files=files)
    assert 400 <= response.status_code < 500
    assert message in response.json()["error"], response.json()
    assert "Traceback" not in response.text and "\n" not in response.json()["error"]


def test_form_mistakes_are_one_line_messages(api: TestClient, scenes) -> None:
    query = png(scenes[0][0])
    assert post(api, query) == (
        400,
        {"error": "choose a saved bank or paint (or upload) support images with masks (not both)"},
    )
    status, answer = post(api, query, bank="scenes", k="0")
    assert status == 422 and answer["error"] == "invalid form: k: Input should be greater than or equal to 1"
    status, answer = post(api, query, bank="scenes", temperature="warm")
    assert status == 422 and answer["error"].startswith("invalid form: temperature:")


@pytest.mark.parametrize(
    "name", ["../scenes", "..", "scenes/../scenes", "/etc", ".hidden", "a\\b", "linked", "x" * 300]
)
def test_bank_names_outside_the_root_are_refused(api: TestClient, scenes, name: str) -> None:
    status, answer = post(api, png(scenes[0][0]), bank=name)
    assert status in (400, 404)
    assert answer["error"].startswith(("bank name", "there is no saved bank named")), answer
    assert "Traceback" not in answer["error"]


def test_server_errors_are_5xx_messages(banks: Path, scenes) -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
        config = AppConfig(banks=banks, url=url, timeout_s=2)
        status, answer = post(TestClient(create_app(config)), png(scenes[0][0]), bank="scenes")
    assert status == 503 and url in answer["error"]

    class Broken(ColourBackend):
        def features(self, images):
            raise RuntimeError("a bug, not a user error")

    response = TestClient(create_app(AppConfig(banks=banks), Broken), raise_server_exceptions=False).post(
        "/api/segment", data={"bank": "scenes"}, files={"query": ("q.png", png(scenes[0][0]), "image/png")}
    )
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError); the app's log has the details"}


def test_config_yaml_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from neco.app import cli as app_cli
    from neco.cli import build_parser

    shipped = load_config(AppConfig, ROOT / "configs" / "app.yaml")
    assert shipped.model_dump(exclude={"url"}) == AppConfig().model_dump(exclude={"url"})
    assert shipped.host == "127.0.0.1" and shipped.url == "localhost:8001"
    args = build_parser().parse_args(["app", "--config", str(ROOT / "configs" / "app.yaml"), "--port", "9000", "k=5"])
    config = app_cli.load_app_config(args)
    assert (config.port, config.k, config.host) == (9000, 5, "127.0.0.1")
    monkeypatch.setattr(app_cli, "_importable", lambda name: name != "uvicorn")
    with pytest.raises(MissingExtraError, match=r"needs the Python package 'uvicorn'.*install the `app` extra"):
        app_cli.app_command(args)


def test_app_extra_pulls_no_heavy_package() -> None:
    """The `app` extra's requirements, resolved through the installed metadata, and the module's imports."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    todo = [Requirement(r) for r in extras["app"] if not r.startswith("neco-dense")] + [
        Requirement(r) for r in extras["client"]
    ]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if f"{name}{sorted(req.extras)}" in seen:
            continue
        seen.add(f"{name}{sorted(req.extras)}")
        for text in metadata.requires(req.name) or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (*req.extras, "")):
                todo.append(dep)
    names = {entry.split("[")[0] for entry in seen}
    assert {"fastapi", "uvicorn", "python-multipart", "starlette"} <= names
    assert not names & {"torch", "torchvision", "timm", "onnxruntime", "onnx", "nvidia-pytriton", "tensorboard"}
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {FORBIDDEN!r}:
                    raise ImportError(name + " is forbidden in the app")
        sys.meta_path.insert(0, Block())
        import neco.app.server, neco.cli
        neco.app.server.create_app(neco.app.server.AppConfig())
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set({FORBIDDEN!r})))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("upsample", ["guided", "bilinear"])
def test_the_page_offers_the_upsampler_and_says_which_made_the_mask(api: TestClient, banks: Path, scenes, upsample):
    query = png(scenes[3][0])
    status, answer = post(api, query, bank="scenes", k="10", temperature="0.05", upsample=upsample)
    assert status == 200, answer
    expected = segment(ColourBackend(), query, banks / "scenes", k=10, temperature=0.05, upsample=upsample)
    np.testing.assert_array_equal(data_url_pixels(answer["results"][0]["mask"]), expected.mask)
    assert answer["upsample"] == answer["results"][0]["upsample"] == upsample
