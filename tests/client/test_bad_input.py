"""Hostile inputs through the client and the `neco` CLI: each one a typed error, never a crash.

Every case goes through `neco features` (exit status 2, one line on stderr, no traceback) with
the server replaced by a numpy stand-in, so what is tested is everything the client does
before a request goes on the wire; one test repeats a few cases against the real embedded
server and then checks that the next good request is answered. A subprocess measures that a
tiny file declaring a huge image never costs memory (issue 14, item 2).
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.client import ContractError, ImageError, MemoryBank, NecoClient, SupportSetError, prepare_image
from neco.contract import OUTPUT_FEATURES, ModelContract
from neco.signature import InputLimits, check_images, output_shape

from .conftest import ARCH, ColourBackend

PATCH_SIZE = ModelContract.for_arch(ARCH).patch_size

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- hostile files
def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG that declares width x height but carries almost no pixel data (a few dozen bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def png_bomb(side: int) -> bytes:
    """A valid grey PNG of side x side zeros: decompresses ~1000x (built row by row, never whole)."""
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png_header_only(side, side)[:33] + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _truncated(fmt: str) -> bytes:
    data = encode(_noise(64, 64), fmt)
    return data[: len(data) // 2]


STRIP = encode(Image.new("L", (10_000, 20)))
"""A 20 x 10,000 grey PNG of a few hundred bytes: at size=448 it would become 448 x 224,000."""

BAD_FILES: dict[str, tuple[bytes, str]] = {
    "non-image": (b"GIF? no: just text\n" * 4, "not an image format"),
    "empty": (b"", "empty"),
    "truncated-png": (_truncated("PNG"), "truncated"),
    "truncated-jpeg": (_truncated("JPEG"), "truncated"),
    "png-declared-0x0": (png_header_only(0, 0), "not an image format"),
    "declared-9000x9000": (png_header_only(9000, 9000), "max_decoded_pixels"),
    "declared-100000x100000": (png_header_only(100_000, 100_000), "decompression bomb"),
    "bomb-10000x10000": (png_bomb(10_000), "decompression bomb"),
    "strip-10000x20": (STRIP, "max_side=4096"),
    "grey-16-bit": (encode(Image.fromarray(np.full((20, 20), 40000, np.uint16))), "16 bits"),
    "rgb-16-bit": (
        png_header_only(20, 20, depth=16, colour=2)[:33]
        + _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + b"\x12\x34" * 60 for _ in range(20))))
        + _chunk(b"IEND", b""),
        "16 bits",
    ),
}


# --------------------------------------------------------------------------- the CLI, offline
class OfflineClient(NecoClient):
    """A NecoClient whose server is a numpy stand-in; decoding, resizing and checks are the real ones."""

    sent: list[tuple[int, ...]] = []

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "m", size=448, **_: object):
        self.url, self.protocol, self.model, self.size, self.timeout_s = "offline:0", protocol, model, size, 1.0
        self.limits, self.batch_size = InputLimits(), 8
        self.contract = ModelContract.for_arch(ARCH)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_images(batch, self.limits, patch_size=self.contract.patch_size)
        OfflineClient.sent.append(batch.shape)
        shape = output_shape(OUTPUT_FEATURES, *batch.shape[:3], self.contract.embed_dim, self.contract.patch_size)
        return np.ones(shape, np.float32) / np.sqrt(shape[-1])

    def close(self) -> None:
        pass


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> type[OfflineClient]:
    monkeypatch.setattr("neco.client.triton.NecoClient", OfflineClient)
    OfflineClient.sent = []
    return OfflineClient


def _features_cli(image: Path, out: Path, *extra: str) -> int:
    from neco.cli import main

    return main(["features", str(image), "--out", str(out), *extra])


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("neco features: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_typed_line_and_exit_2(case: str, offline, tmp_path: Path, capsys) -> None:
    data, message = BAD_FILES[case]
    image = tmp_path / f"{case}.png"
    image.write_bytes(data)
    assert _features_cli(image, tmp_path / "f.npy") == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert offline.sent == [] and not (tmp_path / "f.npy").exists()  # refused before the wire


def test_missing_file_and_folder_are_typed(offline, tmp_path: Path, capsys) -> None:
    assert _features_cli(tmp_path / "absent.png", tmp_path / "f.npy") == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert _features_cli(tmp_path, tmp_path / "f.npy") == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("height", "width", "size", "grid"),
    [
        (1, 1, "448", (32, 32)),  # one pixel is a valid image: scaled up by the policy
        (13, 13, "448", (32, 32)),  # smaller than one patch
        (13, 13, "14", (1, 1)),
        (20, 10_000, "448x448", (32, 32)),  # the 10,000-px strip fits when the size is exact
        (10_000, 20, "4088x14", (292, 1)),  # or any exact size within max_side
    ],
)
def test_tiny_and_extreme_but_valid_images_are_answered(
    height: int, width: int, size: str, grid: tuple[int, int], offline, tmp_path: Path, capsys
) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (width, height), "red").save(image)
    assert _features_cli(image, tmp_path / "f.npy", "--size", size) == 0, capsys.readouterr().err
    assert np.load(tmp_path / "f.npy").shape == (*grid, 384)
    assert offline.sent == [(1, grid[0] * PATCH_SIZE, grid[1] * PATCH_SIZE, 3)]


def test_cmyk_jpeg_is_converted_to_rgb(offline, tmp_path: Path) -> None:
    image = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(image, "JPEG", quality=95)  # pure red ink
    prepared = prepare_image(image, 14, PATCH_SIZE)
    red, green, blue = prepared.array.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60
    assert _features_cli(image, tmp_path / "f.npy", "--size", "14") == 0


def test_exif_rotation_gives_the_mask_the_rotated_size(tmp_path: Path) -> None:
    """A stored 28x42 image with orientation 6 displays as 42x28: its mask must be 42x28."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = encode(_noise(28, 42), exif=exif.tobytes())
    prepared = prepare_image(stored, (42, 28), PATCH_SIZE)
    assert prepared.original_size == (42, 28)
    rotated_mask = np.zeros((42, 28), np.uint8)
    rotated_mask[:, 14:] = 1
    bank = MemoryBank.build(ColourBackend(), [(stored, rotated_mask)], image_size=(42, 28), class_names=["a", "b"])
    assert len(bank) == 6
    with pytest.raises(SupportSetError, match="mask is 28x42 but the image is 42x28"):
        MemoryBank.build(ColourBackend(), [(stored, np.zeros((28, 42), np.uint8))], image_size=(42, 28))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_are_refused_before_sending(value: float, offline) -> None:
    array = np.zeros((28, 28, 3), np.float32)
    array[3, 4, 1] = value
    client = offline()
    with pytest.raises(ImageError, match="NaN or inf"):
        client.features(array)
    with pytest.raises(ImageError, match="uint8"):
        client.features(np.zeros((28, 28, 3), np.float64))
    assert offline.sent == []


def test_the_client_prepares_images_with_its_own_limits(offline) -> None:
    client = offline()
    client.limits = InputLimits(max_side=448, max_image_pixels=224 * 224, max_request_pixels=224 * 224)
    client.size = (238, 238)
    with pytest.raises(ImageError, match="max_image_pixels=50176"):
        client.features(encode(_noise(20, 20)))
    assert offline.sent == []
    client.size = (224, 224)
    assert client.features(encode(_noise(20, 20))).grid == (16, 16)


def test_client_segment_prepares_the_query_with_the_clients_limits(offline, scenes_224) -> None:
    """Regression: `segment` prepared the query with the default limits, not the client's."""
    client = offline()
    bank = MemoryBank.build(ColourBackend(), scenes_224, image_size=224, class_names=["a", "b", "c", "d"])
    client.limits = InputLimits(max_side=448, max_image_pixels=224 * 224, max_request_pixels=224 * 224)
    with pytest.raises(ImageError, match="would be resized to 238x238.*max_image_pixels=50176"):
        client.segment(scenes_224[0][0], bank, size=(238, 238), allow_size_mismatch=True)
    assert offline.sent == []


def test_arrays_follow_the_policy_and_prepared_images_are_sent_unchanged(offline) -> None:
    """No guessing from dtype and shape: only a `PreparedImage` or a [B, H, W, 3] batch skips the policy."""
    client = offline()
    array = np.zeros((224, 224, 3), np.uint8)
    assert client.features(array).image.size == (448, 448)  # size=448: resized like a file would be
    assert client.features(prepare_image(array, 224, PATCH_SIZE)).image.size == (224, 224)
    assert offline.sent == [(1, 448, 448, 3), (1, 224, 224, 3)]
    offline.sent = []
    batch = client.features(np.zeros((10, 28, 42, 3), np.uint8))
    assert batch.shape == (10, 2, 3, 384) and offline.sent == [(8, 28, 42, 3), (2, 28, 42, 3)]  # batch_size 8


def test_a_wrong_answer_shape_is_a_contract_error(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    client = offline(size=28)
    monkeypatch.setattr(client, "_infer", lambda batch: np.ones((len(batch), 1, 1, 384), np.float32))
    with pytest.raises(ContractError, match=r"shape \(1, 1, 1, 384\) .* implies \(1, 2, 2, 384\)"):
        client.features(np.zeros((28, 28, 3), np.uint8))


def test_limits_are_configurable_and_named(tmp_path: Path) -> None:
    small = InputLimits(max_side=448, max_image_pixels=224 * 224, max_request_pixels=224 * 224)
    assert prepare_image(np.zeros((300, 300, 3), np.uint8), 224, PATCH_SIZE, limits=small).size == (224, 224)
    with pytest.raises(ImageError, match="max_image_pixels=50176"):
        prepare_image(np.zeros((300, 400, 3), np.uint8), 224, PATCH_SIZE, limits=small)  # 224 x 294
    assert prepare_image(np.zeros((300, 400, 3), np.uint8), 224, PATCH_SIZE, limits=None).size == (224, 294)
    with pytest.raises(ImageError, match="max_decoded_pixels=1000"):
        prepare_image(encode(_noise(40, 40)), 14, PATCH_SIZE, max_decoded_pixels=1000)


# --------------------------------------------------------------------------- memory
_MEASURE = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from neco.client import ImageError, prepare_image
    data = Path(sys.argv[1]).read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        prepare_image(data, 448, 14)
        outcome = "accepted"
    except ImageError as exc:
        outcome = type(exc).__name__
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(outcome, grown_kib)
    """
)


@pytest.mark.parametrize("case", ["strip-10000x20", "declared-9000x9000", "declared-100000x100000", "bomb-10000x10000"])
def test_refusing_a_huge_image_costs_no_memory(case: str, tmp_path: Path) -> None:
    """Peak RSS of a fresh process grows by < 32 MB (the 448 x 224,000 resize alone is 301 MB)."""
    path = tmp_path / "image.png"
    path.write_bytes(BAD_FILES[case][0])
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    outcome, grown_kib = done.stdout.split()
    assert outcome == "ImageError" and int(grown_kib) < 32 * 1024, done.stdout


# --------------------------------------------------------------------------- the real server
def test_bad_inputs_against_the_embedded_server_then_a_good_one(triton_server, tmp_path: Path, capsys) -> None:
    server = ["--url", triton_server.http_url, "--transport", "http"]
    for case in ("non-image", "truncated-png", "declared-100000x100000", "strip-10000x20", "rgb-16-bit"):
        image = tmp_path / f"{case}.png"
        image.write_bytes(BAD_FILES[case][0])
        assert _features_cli(image, tmp_path / "f.npy", *server) == 2, case
        assert BAD_FILES[case][1] in _one_error_line(capsys.readouterr().err)
    good = tmp_path / "good.png"
    _noise(30, 40).save(good)
    assert _features_cli(good, tmp_path / "f.npy", *server, "--size", "28") == 0
    assert np.load(tmp_path / "f.npy").shape == (2, 3, 384)
