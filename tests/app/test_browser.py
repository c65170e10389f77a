"""The page in a real headless browser (chromium + selenium) against the session's embedded Triton server.

Strokes are drawn with real pointer input on the canvas and the masks the page produces are
checked against the client: the painted sparse mask against the same strokes rasterised here,
every query's mask against `NecoClient.segment` with that sparse mask, pixel for pixel. The run
writes screenshots of the empty page, the painting step and a result gallery to a folder under
the test's temporary directory (docs/app.md shows the same three).
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.app.config import AppConfig
from neco.app.examples import scene_examples
from neco.app.server import create_app
from neco.client import MemoryBank, NecoClient, load_rgb
from neco.contract import IGNORE_INDEX
from neco.scenes import SCENE_CLASSES, generate_scene
from tests.app.test_app import data_url_pixels

SIZE = 112
CLASSES = list(SCENE_CLASSES[:4])
PAINTED = ["background", "object"]
"""The page's default classes: the strokes paint these two."""


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [generate_scene(rng, size=(SIZE, SIZE), num_classes=4) for _ in range(4)]


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"screenshots of the page: {folder}")
    return folder


def browser_binaries() -> tuple[str, str] | None:
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    binaries = browser_binaries()
    if binaries is None:
        pytest.skip(
            "no chromium + chromedriver binary (Debian: apt-get install chromium chromium-driver; make deps-system)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binaries[0]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=binaries[1]))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served_page(triton_server, tmp_path_factory: pytest.TempPathFactory, scenes) -> Iterator[tuple[str, Path]]:
    """uvicorn in a thread on a free loopback port, serving the app against the session's Triton."""
    import uvicorn

    root = tmp_path_factory.mktemp("served_banks")
    with NecoClient(triton_server.grpc_url, model=triton_server.model_name, size=SIZE) as client:
        MemoryBank.build(client, scenes[:3], class_names=CLASSES, image_size=SIZE).save(root / "scenes")
    config = AppConfig(banks=root, url=triton_server.grpc_url, model=triton_server.model_name)
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/", root
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def client_for(triton_server) -> NecoClient:
    return NecoClient(triton_server.grpc_url, model=triton_server.model_name)


def body_attribute(browser, name: str) -> str | None:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").get_attribute(name)


def wait_for(browser, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait_for(browser, lambda b: body_attribute(b, "data-examples") == "loaded", 30)


def wait_done(browser) -> None:
    from selenium.webdriver.common.by import By

    wait_for(browser, lambda b: body_attribute(b, "data-state") in ("done", "error"))
    assert body_attribute(browser, "data-state") == "done", browser.find_element(By.ID, "error").text


def card_masks(browser) -> list[np.ndarray]:
    from selenium.webdriver.common.by import By

    links = browser.find_elements(By.CSS_SELECTOR, "#gallery .card a.mask-download")
    return [data_url_pixels(link.get_attribute("href")) for link in links]


def screenshot(browser, path: Path) -> None:
    """The whole page: the window is made as tall as the document for the shot."""
    width = browser.get_window_size()["width"]
    height, chrome = browser.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    browser.set_window_size(width, max(1000, height + chrome))
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    browser.save_screenshot(str(path))
    browser.set_window_size(width, 1000)


def longest_run(mask: np.ndarray, wanted) -> tuple[int, int, int]:
    """(row, first, last) of the longest horizontal run of pixels where `wanted(mask)` holds."""
    best = (0, 0, -1)
    for row, line in enumerate(wanted(mask)):
        padded = np.concatenate([[False], line, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        for first, stop in zip(edges[::2], edges[1::2]):
            if stop - 1 - first > best[2] - best[1]:
                best = (row, int(first), int(stop - 1))
    return best


def rasterise(shape: tuple[int, int], strokes: list[tuple[int, tuple[int, int], tuple[int, int]]], radius: float):
    """The page's brush in numpy: a pixel takes the label when its centre is within `radius` of the stroke."""
    out = np.full(shape, IGNORE_INDEX, dtype=np.uint8)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    for label, (ax, ay), (bx, by) in strokes:
        a, b = np.array([ax + 0.5, ay + 0.5]), np.array([bx + 0.5, by + 0.5])
        d = b - a
        length2 = float(d @ d)
        t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / length2, 0, 1) if length2 else np.zeros(shape)
        ex, ey = xx - (a[0] + t * d[0]), yy - (a[1] + t * d[1])
        out[ex * ex + ey * ey <= radius * radius] = label
    return out


def draw(browser, canvas, image_width: int, start: tuple[int, int], end: tuple[int, int]) -> None:
    """Press at image pixel `start`, drag to `end`, release: real pointer input, aimed at pixel centres."""
    from selenium.webdriver.common.action_chains import ActionChains

    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    left, top, width, height, view_width, view_height = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, window.innerWidth, window.innerHeight];",
        canvas,
    )
    zoom = width / image_width
    # WebDriver offsets count from the element's in-view centre: the middle of its visible part, floored
    centre_x = (max(left, 0) + min(left + width, view_width)) // 2
    centre_y = (max(top, 0) + min(top + height, view_height)) // 2

    def offset(point: tuple[int, int]) -> tuple[int, int]:
        return round(left + (point[0] + 0.5) * zoom - centre_x), round(top + (point[1] + 0.5) * zoom - centre_y)

    chain = ActionChains(browser).move_to_element_with_offset(canvas, *offset(start)).click_and_hold()
    chain.move_to_element_with_offset(canvas, *offset(end)).release().perform()


def painted_mask(browser) -> np.ndarray:
    """The sparse mask of the first support image, as the PNG the page sends."""
    sent = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.neco.maskPNG(0).then((blob) => { const r = new FileReader(); r.onload = () => done(r.result);"
        " r.readAsDataURL(blob); });"
    )
    return data_url_pixels(sent)


def test_painted_strokes_segment_every_query_like_the_client(
    browser, served_page, triton_server, scenes, tmp_path: Path, screenshots: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = served_page
    support, queries = tmp_path / "support.png", [tmp_path / "query_a.png", tmp_path / "query_b.png"]
    Image.fromarray(scenes[0][0]).save(support)
    for path, (image, _) in zip(queries, scenes[1:3]):
        Image.fromarray(image).save(path)
    open_page(browser, url)
    screenshot(browser, screenshots / "1_empty_page.png")

    browser.find_element(By.ID, "support").send_keys(str(support))
    canvas = browser.find_element(By.ID, "canvas")
    wait_for(browser, lambda b: canvas.get_attribute("width") == str(SIZE), 30)
    ActionChains(browser).send_keys("[").perform()  # brush radius 4 -> 3
    radius = int(browser.find_element(By.ID, "brush").get_attribute("value"))
    assert radius == 3
    mask = scenes[0][1]
    strokes = []
    lower_half = np.arange(SIZE)[:, None] >= SIZE // 2  # a background stroke that shows in the screenshot
    for key, label, wanted in (("1", 0, lambda m: (m == 0) & lower_half), ("2", 1, lambda m: m > 0)):
        row, first, last = longest_run(mask, wanted)
        assert last - first > 2 * radius + 4, "the scene has no room for a stroke"
        ActionChains(browser).send_keys(key).perform()  # the class shortcut
        start, end = (first + radius + 1, row), (last - radius - 1, row)
        draw(browser, canvas, SIZE, start, end)
        strokes.append((label, start, end))
    screenshot(browser, screenshots / "2_painting.png")

    expected_sparse = rasterise(mask.shape, strokes, radius)
    np.testing.assert_array_equal(painted_mask(browser), expected_sparse)
    ActionChains(browser).send_keys("e").perform()  # the eraser, then undo it
    draw(browser, canvas, SIZE, strokes[1][1], strokes[1][2])
    assert (painted_mask(browser) == 1).sum() < (expected_sparse == 1).sum()
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
    sparse = painted_mask(browser)
    np.testing.assert_array_equal(sparse, expected_sparse)
    assert set(np.unique(sparse)) == {0, 1, IGNORE_INDEX}

    browser.find_element(By.ID, "query").send_keys("\n".join(str(q) for q in queries))
    browser.find_element(By.ID, "run").click()
    wait_done(browser)
    shown = card_masks(browser)
    assert len(shown) == 2
    with client_for(triton_server) as client:
        for query, got in zip(queries, shown):
            expected = client.segment(str(query), [(str(support), sparse)], class_names=PAINTED, size=SIZE)
            np.testing.assert_array_equal(got, expected.mask)
    facts = browser.find_element(By.CSS_SELECTOR, "#gallery .card .facts").text
    assert f"encoder ran at {SIZE}x{SIZE} px (8x8 patches), k = 30" in facts
    assert f"resize policy shorter side {SIZE} px" in browser.find_element(By.ID, "summary").text
    screenshot(browser, screenshots / "3_result_gallery.png")


def test_a_click_on_an_example_shows_a_result_without_uploads(browser, served_page, triton_server) -> None:
    from selenium.webdriver.common.by import By

    url, _ = served_page
    open_page(browser, url)
    browser.find_element(By.CSS_SELECTOR, '#examples button[data-example="scenes-shapes"]').click()
    wait_done(browser)
    example = scene_examples()[0]
    shown = card_masks(browser)
    assert len(shown) == len(example.queries) == 3
    pairs = [(load_rgb(example.support), example.mask)]
    with client_for(triton_server) as client:
        for query, got in zip(example.queries, shown):
            expected = client.segment(query, pairs, class_names=example.classes, size=SIZE)
            np.testing.assert_array_equal(got, expected.mask)
    link = browser.find_element(By.ID, "bank-download").get_attribute("href")
    with urllib.request.urlopen(link, timeout=30) as answer:
        names = zipfile.ZipFile(io.BytesIO(answer.read())).namelist()
    assert "bank/manifest.json" in names


def test_a_saved_bank_segments_a_query_like_the_client(browser, served_page, triton_server, scenes, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, banks = served_page
    query = tmp_path / "query.png"
    Image.fromarray(scenes[3][0]).save(query)
    open_page(browser, url)
    Select(browser.find_element(By.ID, "bank")).select_by_value("scenes")
    browser.find_element(By.ID, "query").send_keys(str(query))
    browser.find_element(By.ID, "run").click()
    wait_done(browser)
    with client_for(triton_server) as client:
        expected = client.segment(str(query), str(banks / "scenes"))
    (shown,) = card_masks(browser)
    np.testing.assert_array_equal(shown, expected.mask)
    legend = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
    assert legend == [CLASSES[c] for c in np.unique(expected.mask)]

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    browser.find_element(By.ID, "query").send_keys(str(broken))
    browser.find_element(By.ID, "run").click()
    wait_for(browser, lambda b: body_attribute(b, "data-state") == "error")
    message = browser.find_element(By.ID, "error").text
    assert "query image 'broken.png'" in message and "Traceback" not in browser.page_source
