"""Image decoding and the resize policy: formats, orientation, patch mapping, typed errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco.client import ImageError, SupportSetError, load_mask, load_rgb, prepare_image
from neco.client.images import resize_mask, target_size
from neco.contract import DEFAULT_ARCH, ModelContract

PATCH_SIZE = ModelContract.for_arch(DEFAULT_ARCH).patch_size


def _png_bytes(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def _rgb16_png(height: int, width: int) -> bytes:
    """A 16-bit-per-channel RGB PNG, hand-encoded (Pillow opens it as 8-bit 'RGB')."""
    rows = np.random.default_rng(0).integers(0, 65535, (height, width, 3)).astype(">u2")
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("original", "size", "expected"),
    [
        ((480, 640), 448, (448, 602)),  # shorter side -> 448, 597.3 rounds to 43 patches
        ((640, 480), 448, (602, 448)),
        ((100, 100), 224, (224, 224)),
        ((3, 1000), 14, (14, 4662)),  # at least one patch; aspect kept
        ((480, 640), (448, 448), (448, 448)),
        ((480, 640), (450, 300), (448, 294)),  # exact sizes are snapped to patch multiples
    ],
)
def test_resize_policy(original: tuple[int, int], size, expected: tuple[int, int]) -> None:
    assert target_size(original, size, PATCH_SIZE) == expected
    assert all(side % PATCH_SIZE == 0 for side in expected)


def test_prepared_image_maps_patches_to_original_pixels() -> None:
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    prepared = prepare_image(image, 224, PATCH_SIZE)
    assert prepared.original_size == (300, 400)
    assert prepared.size == (224, 294) and prepared.grid == (16, 21)
    top, left, bottom, right = prepared.patch_box(15, 20)
    assert bottom == pytest.approx(300) and right == pytest.approx(400)
    assert prepared.patch_box(0, 0)[2] == pytest.approx(14 * 300 / 224)
    with pytest.raises(IndexError):
        prepared.patch_box(16, 0)


def test_all_input_kinds_decode_to_the_same_rgb(tmp_path: Path) -> None:
    array = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(array), array):
        np.testing.assert_array_equal(load_rgb(source), array)


def test_grey_rgba_palette_and_exif_orientation() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(load_rgb(grey), np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(load_rgb(Image.fromarray(grey, "L")), np.repeat(grey[:, :, None], 3, axis=2))

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent -> white background
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    out = load_rgb(rgba)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    assert abs(int(out[1, 0, 0]) - 127) <= 1

    palette_image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    np.testing.assert_array_equal(load_rgb(_png_bytes(palette_image)), [[[10, 20, 30], [200, 100, 50]]])

    # EXIF orientation 6 = "rotate 90 CW to display": a 2x3 stored image displays as 3x2.
    stored = np.zeros((2, 3, 3), dtype=np.uint8)
    stored[0, 0] = 255  # top-left stored pixel ends up top-right when displayed
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = load_rgb(_png_bytes(Image.fromarray(stored), exif=exif))
    assert decoded.shape == (3, 2, 3)
    assert decoded[0, 1].tolist() == [255, 255, 255] and decoded[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (np.zeros((0, 5, 3), np.uint8), "no pixels"),
        (np.zeros((4, 4, 3), np.uint16), "16-bit"),
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 2), np.uint8), "expected HxW"),
        (b"this is not an image", "not an image"),
        (b"", "empty"),
        (Image.new("RGB", (0, 0)), "no pixels"),
        (Image.fromarray(np.zeros((4, 4), np.uint16)), "16/32-bit"),
        (_rgb16_png(4, 5), "16 bits"),
        (Image.open(io.BytesIO(_rgb16_png(4, 5))), "16 bits"),  # a lazily opened PIL image too
        (12345, "cannot read"),
    ],
)
def test_bad_images_raise_image_error(source: object, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        prepare_image(source, 224, PATCH_SIZE)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(data[: len(data) // 2])
    jpeg = _png_bytes(Image.new("RGB", (64, 64), "red"), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageError, match="does not exist"):
        load_rgb(tmp_path / "missing.png")
    assert issubclass(ImageError, ValueError)


def test_masks_decode_indices_and_reject_colour() -> None:
    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    indexed = Image.fromarray(labels, "P")
    indexed.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255] * 759)
    np.testing.assert_array_equal(load_mask(_png_bytes(indexed)), labels)  # indices, not colours
    np.testing.assert_array_equal(load_mask(labels), labels)
    with pytest.raises(SupportSetError, match="single-channel"):
        load_mask(Image.fromarray(np.zeros((2, 2, 3), np.uint8)))
    with pytest.raises(SupportSetError, match="negative"):
        load_mask(np.array([[0, -1]]))
    with pytest.raises(SupportSetError, match="integer"):
        load_mask(np.zeros((2, 2), np.float32))


def test_resize_mask_is_nearest_neighbour() -> None:
    mask = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(resize_mask(mask, (4, 4)), np.kron(mask, np.ones((2, 2), int)))
    assert set(np.unique(resize_mask(np.array([[0, 300]]), (3, 7)))) == {0, 300}


def test_a_prepared_image_keeps_the_decoded_input(tmp_path: Path) -> None:
    """What overlays draw on, so a query is decoded once; no copy when no resize was needed."""
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    prepared = prepare_image(tmp_path / "image.png", 14, PATCH_SIZE)
    assert prepared.size == (14, 14) and prepared.original_size == (30, 40)
    np.testing.assert_array_equal(prepared.original, pixels)
    unchanged = prepare_image(pixels[:28, :28], (28, 28), PATCH_SIZE)
    assert unchanged.original is unchanged.array
