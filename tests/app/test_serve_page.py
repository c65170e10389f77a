"""`neco app --serve REPOSITORY` as a user starts it: the page and its own Triton server, one process.

It must answer a segmentation through its embedded server, and one SIGTERM must stop the page and
every server process below it (Triton's own binary and backend stub included).
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from neco.client import load_mask
from tests.app.test_app import data_url_pixels


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = "neco" + secrets.token_hex(8)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    for field, name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    return b"".join([*parts, f"--{boundary}--\r\n".encode()]), f"multipart/form-data; boundary={boundary}"


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, of in parents.items():
            if of == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> dict[int, str]:
    """The command lines of the `pids` still running (zombies count as gone: they have exited)."""
    running = {}
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
    return running


def test_neco_app_serve_starts_serves_and_stops_as_one_process(model_repository: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    neco = Path(sys.executable).with_name("neco")
    command = [str(neco), "app", "--serve", str(model_repository), "--port", str(port), f"banks={tmp_path}"]
    app = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert app.poll() is None, app.stdout.read() if app.stdout else ""
            try:
                with urllib.request.urlopen(base + "api/examples", timeout=5) as answer:
                    example = json.load(answer)["examples"][0]
                break
            except OSError:
                assert time.monotonic() < deadline, "neco app --serve did not answer in 300 s"
                time.sleep(1)
        with urllib.request.urlopen(base, timeout=10) as answer:
            assert b'id="canvas"' in answer.read()
        queries = [
            ("query", f"q{i}.png", urllib.request.urlopen(base + q).read()) for i, q in enumerate(example["queries"])
        ]
        mask = np.frombuffer(base64.b64decode(example["labels"]), np.uint8)
        mask = mask.reshape(example["support"]["height"], example["support"]["width"])
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG")
        files = [*queries, ("support", "s.png", urllib.request.urlopen(base + example["support"]["url"]).read())]
        files.append(("support", "s_mask.png", buffer.getvalue()))
        body, kind = multipart({"classes": ", ".join(example["classes"])}, files)
        request = urllib.request.Request(base + "api/segment", data=body, headers={"content-type": kind})
        with urllib.request.urlopen(request, timeout=120) as answer:
            results = json.load(answer)["results"]
        assert len(results) == len(example["queries"])
        assert load_mask(data_url_pixels(results[0]["mask"])).shape == mask.shape
        below = descendants(app.pid)
        assert below, "the embedded server runs as the app's child"
    finally:
        app.send_signal(signal.SIGTERM)
        output = app.communicate(timeout=90)[0]
    assert app.returncode == 0, output[-3000:]
    deadline = time.monotonic() + 20  # Triton's backend stub notices its server's exit within seconds
    while (left := alive(below)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"server processes outlived the app: {left}"
