"""The page's bounds (issue 34 items 4 and 10): classes, pixels, label transfer, form values, uploads in memory.

The hostile requests of the issue (100,000 class names, an 8000 x 8000 PNG) run in a subprocess
that measures its own peak RSS around each request (`/proc/self/status` VmHWM, reset through
`/proc/self/clear_refs`), under an address-space limit so that a regression fails the test
instead of exhausting the machine.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tempfile
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from neco.app.config import AppConfig
from neco.app.segmenter import PREVIEW_SIDE
from neco.app.server import create_app
from neco.client import MemoryBank
from neco.contract import ModelContract
from neco.scenes import SCENE_CLASSES, generate_scene
from tests.client.conftest import ARCH, ColourBackend

ROOT = Path(__file__).resolve().parents[2]
SIZE = 112
CLASSES = list(SCENE_CLASSES[:4])
REFUSED_PEAK_MIB = 64
"""Peak RSS growth allowed for a refused request: it must be refused before anything large exists."""
SERVED_PEAK_MIB = 400
"""Peak RSS growth allowed for a 4096 x 4096 query, the largest image the default limits accept (~170 MiB)."""


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [generate_scene(rng, size=(SIZE, SIZE), num_classes=4) for _ in range(3)]


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory, scenes) -> Path:
    """`scenes` (the test backend's model) and `other` (built by another model: a contract conflict)."""
    root = tmp_path_factory.mktemp("banks")
    MemoryBank.build(ColourBackend(), scenes[:2], class_names=CLASSES, image_size=SIZE).save(root / "scenes")
    other = ColourBackend(ModelContract.for_arch(ARCH, training_hash="another-run"))
    MemoryBank.build(other, scenes[:2], class_names=CLASSES, image_size=SIZE).save(root / "other")
    return root


def api(banks: Path, **limits: object) -> TestClient:
    return TestClient(create_app(AppConfig(banks=banks, size=SIZE, **limits), ColourBackend))


def support_files(scenes, count: int = 1) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = [("support", (f"s{i}.png", png(scenes[i][0]), "image/png")) for i in range(count)]
    return files + [("support", (f"s{i}_mask.png", png(scenes[i][1]), "image/png")) for i in range(count)]


MEASURE = textwrap.dedent(
    """
    import io, json, resource, sys
    import numpy as np
    from PIL import Image
    from fastapi.testclient import TestClient
    from neco.app.config import AppConfig
    from neco.app.server import create_app
    from tests.client.conftest import ColourBackend

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    def stripes(side):
        image = np.zeros((side, side, 3), np.uint8)
        image[::7, ::5] = 200
        return png(image)

    query = open(sys.argv[2], "rb").read()
    support = json.loads(sys.argv[3])
    app = TestClient(create_app(AppConfig(banks=sys.argv[1], size=112), ColourBackend))
    warm = app.post("/api/segment", data={"bank": "scenes"}, files={"query": ("q.png", query)})
    assert warm.status_code == 200, warm.text
    big, huge = stripes(4096), stripes(8000)  # 4096^2 is the largest image the defaults accept
    pair = [("support", (name, open(path, "rb").read())) for name, path in zip(("s.png", "s_mask.png"), support)]
    names = ",".join(f"c{i}" for i in range(100_000))  # 0.7 MB
    cases = {
        "100,000 class names": ({"classes": names}, [("query", ("q.png", query)), *pair]),
        "8000x8000 query": ({"bank": "scenes"}, [("query", ("big.png", huge))]),
        "8000x8000 support pair": ({}, [("query", ("q.png", query)), ("support", ("s.png", huge)),
                                        ("support", ("s_mask.png", huge))]),
        "4096x4096 query": ({"bank": "scenes"}, [("query", ("big.png", big))]),
    }
    virtual = status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (virtual + 3 * 2**30, resource.RLIM_INFINITY))
    for name, (data, files) in cases.items():
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # the peak (VmHWM) restarts from the current RSS
        except OSError:
            pass  # the peak so far (a 112-px request) then counts too: the figure only grows
        before = status("VmRSS")
        response = app.post("/api/segment", data=data, files=files)
        answer = response.json()
        print(json.dumps({"case": name, "status": response.status_code, "error": answer.get("error"),
                          "peak_mib": (status("VmHWM") - before) / 2**20}), flush=True)
    """
)


def test_hostile_requests_have_a_measured_peak_memory_bound(banks: Path, scenes, tmp_path: Path) -> None:
    query, image, mask = tmp_path / "q.png", tmp_path / "s.png", tmp_path / "s_mask.png"
    query.write_bytes(png(scenes[2][0]))
    image.write_bytes(png(scenes[0][0]))
    mask.write_bytes(png(scenes[0][1]))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(banks), str(query), json.dumps([str(image), str(mask)])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    print(json.dumps(results, indent=1))  # the measured figures, shown with -s
    for case in ("100,000 class names", "8000x8000 query", "8000x8000 support pair"):
        assert results[case]["status"] == 413, results[case]
        assert results[case]["peak_mib"] < REFUSED_PEAK_MIB, results[case]
    assert "100,000 classes; the page serves at most 256 (max_classes)" in results["100,000 class names"]["error"]
    assert "8000x8000 = 64,000,000 px" in results["8000x8000 query"]["error"]
    assert "max_image_pixels" in results["8000x8000 support pair"]["error"]
    served = results["4096x4096 query"]
    assert served["status"] == 200 and served["peak_mib"] < SERVED_PEAK_MIB, served


def test_class_limits_cover_typed_listed_inferred_and_saved_classes(banks: Path, scenes) -> None:
    client = api(banks, max_classes=3)
    query = ("query", ("q.png", png(scenes[2][0]), "image/png"))
    response = client.post("/api/segment", data={"classes": "a,b,c,d"}, files=[query, *support_files(scenes)])
    assert response.status_code == 413 and response.json()["error"].startswith("the class list has 4 classes")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/classes.json", json.dumps(CLASSES))
        zf.writestr("set/images/0.png", png(scenes[0][0]))
        zf.writestr("set/masks/0.png", png(scenes[0][1]))
    response = client.post("/api/segment", files=[query, ("support", ("set.zip", archive.getvalue(), "x"))])
    assert response.status_code == 413 and "the support set has 4 classes" in response.json()["error"]
    stray = scenes[0][1].copy()
    stray[0, 0] = 200  # no class list: K would be inferred as 201
    response = api(banks, max_classes=100).post(
        "/api/segment",
        files=[query, ("support", ("s.png", png(scenes[0][0]), "x")), ("support", ("s_mask.png", png(stray), "x"))],
    )
    assert response.status_code == 413 and "the support set has 201 classes" in response.json()["error"]
    response = client.post("/api/segment", data={"bank": "scenes"}, files=[query])
    assert response.status_code == 413 and response.json()["error"].startswith("bank 'scenes' has 4 classes")


def test_pixel_limits_per_image_and_per_request(banks: Path, scenes) -> None:
    query = ("query", ("q.png", png(scenes[2][0]), "image/png"))
    answer = api(banks, max_image_pixels=SIZE * SIZE - 1).post("/api/segment", data={"bank": "scenes"}, files=[query])
    assert answer.status_code == 413
    assert answer.json()["error"] == (
        "query image 'q.png' is 112x112 = 12,544 px; the page decodes at most 12,543 px per image (max_image_pixels)"
    )
    header = bytearray(png(np.zeros((1, 1), np.uint8)))  # IHDR declares 40000 x 40000: Pillow refuses it on open
    header[16:24] = (40_000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    answer = api(banks).post("/api/segment", data={"bank": "scenes"}, files={"query": ("bomb.png", bytes(header), "x")})
    assert answer.status_code == 413
    assert answer.json()["error"].startswith("query image 'bomb.png' declares a gigantic size; the page decodes")
    # the query and one pair fit; a second pair does not, and nothing of it is decoded
    client = api(banks, max_request_pixels=3 * SIZE * SIZE)
    assert client.post("/api/segment", data={"classes": "a,b,c,d"}, files=[query, *support_files(scenes)]).is_success
    answer = client.post("/api/segment", data={"classes": "a,b,c,d"}, files=[query, *support_files(scenes, 2)])
    assert answer.status_code == 413 and "max_request_pixels" in answer.json()["error"]


def test_label_transfer_budget_names_k(banks: Path, scenes) -> None:
    client = api(banks, max_transfer_mb=0.015)  # 64 patches x k x 4 classes x 4 bytes: k=10 fits, k=20 does not
    query = {"query": ("q.png", png(scenes[2][0]), "image/png")}
    assert client.post("/api/segment", data={"bank": "scenes", "k": "10"}, files=query).is_success
    answer = client.post("/api/segment", data={"bank": "scenes", "k": "20"}, files=query)
    assert answer.status_code == 413
    assert answer.json()["error"].startswith("k=20 neighbours x 4 classes x 64 query patches need 0.02 MiB")
    assert "(max_transfer_mb): lower k" in answer.json()["error"]


def test_tiny_temperature_is_a_422_not_a_500(banks: Path, scenes) -> None:
    query = {"query": ("q.png", png(scenes[2][0]), "image/png")}
    answer = api(banks).post("/api/segment", data={"bank": "scenes", "temperature": "1e-300"}, files=query)
    assert answer.status_code == 422
    assert answer.json() == {"error": "invalid form: temperature: Input should be greater than or equal to 0.0001"}


def test_uploads_are_never_written_to_disk(banks: Path, scenes, monkeypatch: pytest.MonkeyPatch) -> None:
    """starlette spools uploads over 1 MiB to a temporary file; the page keeps them in memory."""
    rolled: list[int] = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(1))
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)  # ~1.9 MB as PNG
    upload = png(noise)
    assert len(upload) > 1024 * 1024
    answer = api(banks, max_upload_mb=4).post(
        "/api/segment", data={"bank": "scenes"}, files={"query": ("noise.png", upload, "image/png")}
    )
    assert answer.status_code == 200, answer.text
    assert rolled == []


def test_bank_conflict_names_the_bank_not_the_servers_path(banks: Path, scenes) -> None:
    answer = api(banks).post(
        "/api/segment", data={"bank": "other"}, files={"query": ("q.png", png(scenes[2][0]), "image/png")}
    )
    assert answer.status_code == 409
    message = answer.json()["error"]
    assert message.startswith("memory bank 'other' was built with") and str(banks) not in message


def test_large_queries_get_previews_and_a_full_size_mask(banks: Path) -> None:
    wide = np.zeros((300, PREVIEW_SIDE + 200, 3), dtype=np.uint8)
    wide[:, ::2] = 255
    answer = api(banks).post("/api/segment", data={"bank": "scenes"}, files={"query": ("w.png", png(wide), "x")})
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]

    def shape(name: str) -> tuple[int, ...]:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(result[name].partition(",")[2])))).shape

    assert shape("mask") == (300, PREVIEW_SIDE + 200) and result["size"] == [300, PREVIEW_SIDE + 200]
    assert shape("pca")[:2] == (round(300 * PREVIEW_SIDE / (PREVIEW_SIDE + 200)), PREVIEW_SIDE)
    assert shape("overlay")[1] == PREVIEW_SIDE and shape("confidence")[0] == shape("pca")[0]


def test_a_rewritten_saved_bank_is_loaded_again(tmp_path: Path, scenes) -> None:
    """The bank cache keys on the bank folder's inode and mtime, which every `MemoryBank.save` replaces."""
    client = api(tmp_path)
    query = {"query": ("q.png", png(scenes[2][0]), "image/png")}
    MemoryBank.build(ColourBackend(), scenes[:2], class_names=CLASSES, image_size=SIZE).save(tmp_path / "live")
    assert client.post("/api/segment", data={"bank": "live"}, files=query).json()["bank"]["classes"] == CLASSES
    renamed = [name.upper() for name in CLASSES]
    MemoryBank.build(ColourBackend(), scenes[:2], class_names=renamed, image_size=SIZE).save(tmp_path / "live")
    assert client.post("/api/segment", data={"bank": "live"}, files=query).json()["bank"]["classes"] == renamed
