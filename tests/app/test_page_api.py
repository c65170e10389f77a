"""The page's API for painted supports (issue 32): many queries, the size control, notes, examples, bank zips.

All on the colour backend (no server): every mask is compared with `client.segment` on the same
inputs, and every downloaded bank is loaded again and segments like the bank it came from.
"""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from neco.app import launcher
from neco.app.config import AppConfig
from neco.app.examples import ExampleError, folder_examples
from neco.app.segmenter import Bank, notes
from neco.app.server import create_app
from neco.client import MemoryBank, segment
from neco.contract import IGNORE_INDEX
from neco.scenes import SCENE_CLASSES, generate_scene, write_scene_dataset
from tests.app.test_app import data_url_pixels, png
from tests.client.conftest import ColourBackend

SIZE = 112
CLASSES = ["background", "object"]


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [generate_scene(rng, size=(SIZE, SIZE), num_classes=4) for _ in range(4)]


def sparse(mask: np.ndarray) -> np.ndarray:
    """A few strokes' worth of labels: one row band of background, one of the first object, the rest ignored."""
    out = np.full(mask.shape, IGNORE_INDEX, dtype=np.uint8)
    rows, cols = np.nonzero(mask > 0)
    out[5:9, 5:60] = np.where(mask[5:9, 5:60] == 0, 0, IGNORE_INDEX)
    out[rows[: len(rows) // 3], cols[: len(rows) // 3]] = 1
    return out


def painted(scenes, **data: str) -> tuple[int, dict]:
    """POST two queries with one painted support, as the page sends them."""
    image, mask = scenes[0]
    files = [("query", (f"q{i}.png", png(scenes[i][0]), "image/png")) for i in (2, 3)]
    files += [("support", ("painted0.png", png(image), "image/png"))]
    files += [("support", ("painted0_mask.png", png(sparse(mask)), "image/png"))]
    fields = {"classes": ", ".join(CLASSES), "colours": "#102030,#f0e0d0", **data}
    response = TestClient(create_app(AppConfig(), ColourBackend)).post("/api/segment", data=fields, files=files)
    return response.status_code, response.json()


def test_painted_support_segments_every_query_like_the_client(scenes) -> None:
    status, answer = painted(scenes)
    assert status == 200, answer
    pairs = [(scenes[0][0], sparse(scenes[0][1]))]
    assert [r["name"] for r in answer["results"]] == ["q2.png", "q3.png"]
    for result, index in zip(answer["results"], (2, 3)):
        expected = segment(ColourBackend(), scenes[index][0], pairs, class_names=CLASSES, size=SIZE)
        np.testing.assert_array_equal(data_url_pixels(result["mask"]), expected.mask)
        assert result["input_size"] == [SIZE, SIZE] and result["grid"] == [8, 8]
    bank = answer["bank"]
    assert bank["policy"] == f"shorter side {SIZE} px" and bank["support_side"] == SIZE  # the images' own size
    assert bank["classes"] == CLASSES and bank["label"] == "1 support image"
    built = MemoryBank.build(ColourBackend(), pairs, class_names=CLASSES, image_size=SIZE)
    assert bank["patches"] == len(built) < 64  # patches made only of ignore pixels are not in the bank
    legend = {entry["name"]: entry["colour"] for r in answer["results"] for entry in r["legend"]}
    assert legend == {"background": "#102030", "object": "#f0e0d0"}  # the page's colours, in its one legend


def test_the_size_control_sets_the_encoder_size_and_the_result_says_it(scenes) -> None:
    status, answer = painted(scenes, size="224")
    assert status == 200, answer
    assert answer["bank"]["policy"] == "shorter side 224 px"
    result = answer["results"][0]
    assert result["input_size"] == [224, 224] and result["grid"] == [16, 16] and result["size"] == [SIZE, SIZE]
    pairs = [(scenes[0][0], sparse(scenes[0][1]))]
    expected = segment(ColourBackend(), scenes[2][0], pairs, class_names=CLASSES, size=224)
    np.testing.assert_array_equal(data_url_pixels(result["mask"]), expected.mask)
    status, answer = painted(scenes, size="7")
    assert status == 422 and answer["error"].startswith("invalid form: size:")


def test_a_saved_bank_refuses_another_size_naming_both(tmp_path: Path, scenes) -> None:
    MemoryBank.build(ColourBackend(), scenes[:2], class_names=list(SCENE_CLASSES[:4]), image_size=SIZE).save(
        tmp_path / "scenes"
    )
    api = TestClient(create_app(AppConfig(banks=tmp_path), ColourBackend))
    query = {"query": ("q.png", png(scenes[3][0]), "image/png")}
    answer = api.post("/api/segment", data={"bank": "scenes", "size": "448"}, files=query)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("size 448 px was asked but bank 'scenes' was built at shorter side 112 px")
    assert api.post("/api/segment", data={"bank": "scenes", "size": str(SIZE)}, files=query).status_code == 200


def test_a_query_at_another_scale_gets_a_note_naming_both_sizes(scenes) -> None:
    big = np.asarray(Image.fromarray(scenes[2][0]).resize((448, 448), Image.Resampling.NEAREST))
    image, mask = scenes[0]
    files = [("query", ("big.png", png(big), "image/png")), ("query", ("same.png", png(scenes[3][0]), "image/png"))]
    files += [("support", ("s.png", png(image), "image/png")), ("support", ("s_mask.png", png(sparse(mask)), "x"))]
    response = TestClient(create_app(AppConfig(), ColourBackend)).post(
        "/api/segment", data={"classes": "background, object"}, files=files
    )
    big_result, same_result = response.json()["results"]
    assert big_result["notes"][0].startswith("query at 448 px, support images at 112 px, bank at 112 px")
    assert big_result["input_size"] == [SIZE, SIZE] and big_result["size"] == [448, 448]
    assert not any(note.startswith("query at") for note in same_result["notes"])


def test_bank_downloads_load_again_and_segment_the_same(tmp_path: Path, scenes) -> None:
    status, answer = painted(scenes)
    assert status == 200
    api = TestClient(create_app(AppConfig(banks=tmp_path), ColourBackend))
    assert api.get(answer["bank"]["download"]).status_code == 404  # another app instance never built it
    app = create_app(AppConfig(banks=tmp_path), ColourBackend)
    api = TestClient(app)
    image, mask = scenes[0]
    files = [("query", ("q.png", png(scenes[2][0]), "image/png"))]
    files += [("support", ("s.png", png(image), "image/png")), ("support", ("s_mask.png", png(sparse(mask)), "x"))]
    answer = api.post("/api/segment", data={"classes": "background, object"}, files=files).json()
    download = api.get(answer["bank"]["download"])
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(tmp_path / "unzipped")
    reloaded = segment(ColourBackend(), scenes[2][0], tmp_path / "unzipped" / "bank")
    np.testing.assert_array_equal(reloaded.mask, data_url_pixels(answer["results"][0]["mask"]))

    MemoryBank.load(tmp_path / "unzipped" / "bank").save(tmp_path / "again")
    saved = api.get("/api/banks/again.zip")
    assert saved.status_code == 200 and saved.headers["content-disposition"] == 'attachment; filename="again.zip"'
    assert all(name.startswith("again/") for name in zipfile.ZipFile(io.BytesIO(saved.content)).namelist())
    assert api.get("/api/banks/..%2Fetc.zip").status_code in (400, 404)


def test_examples_are_listed_and_served_from_memory(tmp_path: Path) -> None:
    write_scene_dataset(tmp_path / "mine", splits={"train": 3}, size=(64, 64))
    api = TestClient(create_app(AppConfig(examples=tmp_path / "mine" / "train"), ColourBackend))
    examples = api.get("/api/examples").json()["examples"]
    assert [e["id"] for e in examples] == ["scenes-shapes", "scenes-textures", "folder-train"]
    for example in examples:
        support = api.get(example["support"]["url"])
        assert support.status_code == 200 and support.headers["content-type"] == "image/png"
        height, width = example["support"]["height"], example["support"]["width"]
        labels = np.frombuffer(base64.b64decode(example["labels"]), np.uint8).reshape(height, width)
        assert Image.open(io.BytesIO(support.content)).size == (width, height)
        assert labels.max() < len(example["classes"])
        assert all(api.get(url).status_code == 200 for url in example["queries"])
    assert len(examples[2]["queries"]) == 2 and examples[2]["classes"] == list(SCENE_CLASSES[:4])
    assert api.get("/api/examples/nothing/support.png").json() == {"error": "there is no example named 'nothing'"}
    with pytest.raises(ExampleError, match="neither it nor a sub-folder holds images/"):
        folder_examples(tmp_path, 1 << 20)


def test_query_count_and_colours_are_checked(scenes) -> None:
    api = TestClient(create_app(AppConfig(max_queries=2), ColourBackend))
    files = [("query", (f"q{i}.png", png(scenes[0][0]), "image/png")) for i in range(3)]
    answer = api.post("/api/segment", data={"bank": "x"}, files=files)
    assert answer.status_code == 413 and "at most 2 at once (max_queries)" in answer.json()["error"]
    status, answer = painted(scenes, colours="#102030,red")
    assert status == 400 and answer["error"] == "class colours are written #rrggbb, got 'red'"


def test_config_and_cli_know_serve_and_examples(tmp_path: Path) -> None:
    from neco.app import cli as app_cli
    from neco.cli import build_parser
    from neco.config import ConfigError

    args = build_parser().parse_args(["app", "--serve", str(tmp_path / "repo"), "--examples", str(tmp_path)])
    assert args.serve == tmp_path / "repo" and app_cli.load_app_config(args).examples == tmp_path
    with pytest.raises(ConfigError, match="model repository .* does not exist"):
        app_cli.app_command(args)
    both = build_parser().parse_args(["app", "--serve", str(tmp_path), "--url", "h:1"])
    with pytest.raises(ConfigError, match="either --serve REPOSITORY"):
        app_cli.app_command(both)


FAKE_SERVER = """
import sys, time
print("some start-up noise", flush=True)
if sys.argv[1] == "fail":
    print("tritonserver: model failed to load", flush=True)
    sys.exit(3)
print("serving neco_dinov2 v1 (CPUExecutionProvider) on http 127.0.0.1:1  grpc 127.0.0.1:4242  metrics x", flush=True)
time.sleep(60)
"""


def test_the_launcher_yields_the_grpc_address_and_stops_the_server(monkeypatch, tmp_path: Path) -> None:
    command = launcher.server_command(tmp_path, "m")
    assert command[1:3] == ["-m", "neco.serving"] and {"http_port=0", "grpc_port=0", "model_name=m"} <= set(command)
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(launcher, "server_command", lambda repository, model: [sys.executable, str(script), model])
    started: list[subprocess.Popen] = []
    popen = subprocess.Popen

    def recording(*args, **kwargs) -> subprocess.Popen:
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording)
    with launcher.embedded_server(tmp_path, "ok", timeout_s=30) as url:
        assert url == "127.0.0.1:4242" and started[0].poll() is None
    assert started[0].returncode == -signal.SIGTERM  # stopped on the way out, not left running
    with pytest.raises(launcher.ServerStartError, match=r"exited with 3: .*model failed to load"):
        with launcher.embedded_server(tmp_path, "fail", timeout_s=30):
            pass


def test_a_low_confidence_result_says_what_to_do(scenes) -> None:
    memory = MemoryBank.build(ColourBackend(), scenes[:1], class_names=list(SCENE_CLASSES[:4]), image_size=SIZE)
    bank = Bank(memory, "saved bank 'x'", "api/banks/x.zip", None)
    (said,) = notes((SIZE, 150), bank, 0.31)
    assert said.startswith("low confidence (0.31): the query may show classes or looks the support lacks")
    scale, low = notes((448, 600), bank, 0.2)
    assert scale.startswith("query at 448 px, bank at 112 px: the query was resized 4x") and low.startswith("low")
    assert notes((SIZE, SIZE), bank, 0.9) == []
