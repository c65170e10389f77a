"""Property-based tests (hypothesis) of image decoding, the resize geometry and mask validation.

The properties are the policy's promises, checked on generated inputs: decoding is lossless
for PNG and never fails with anything but `ImageError`, whatever the bytes; resize targets are
positive patch multiples that keep the aspect within half a patch and respect the limits;
masks keep their labels through validation and nearest-neighbour resizing.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from neco.client import ImageError, SupportSetError, load_mask, load_rgb
from neco.client.images import resize_mask, target_size
from neco.contract import DEFAULT_ARCH, ModelContract
from neco.signature import InputLimits


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


PROFILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
P = ModelContract.for_arch(DEFAULT_ARCH).patch_size

sides = st.integers(1, 20_000)
short_sizes = st.integers(1, 2_000)
exact_sizes = st.tuples(st.integers(1, 5_000), st.integers(1, 5_000))
limits = st.builds(
    InputLimits,
    max_side=st.integers(P, 8_192),
    max_image_pixels=st.integers(P * P, 4 * 1024 * 1024),
    max_request_pixels=st.integers(P * P, 8 * 1024 * 1024),
)


# --------------------------------------------------------------------------- resize geometry
@PROFILE
@given(height=sides, width=sides, size=st.one_of(short_sizes, exact_sizes))
def test_targets_are_positive_patch_multiples(height: int, width: int, size) -> None:
    new_h, new_w = target_size((height, width), size, P)
    assert new_h >= P and new_w >= P and new_h % P == 0 and new_w % P == 0


@PROFILE
@given(height=sides, width=sides, size=short_sizes)
def test_shorter_side_policy_keeps_the_aspect_within_half_a_patch(height: int, width: int, size: int) -> None:
    new_h, new_w = target_size((height, width), size, P)
    factor = size / min(height, width)
    for new, old in ((new_h, height), (new_w, width)):
        goal = old * factor
        # each side is the nearest patch multiple of its scaled length, or one patch when that is < 1 patch
        assert abs(new - goal) <= P / 2 + 1e-6 or (new == P and goal < P)
    assert target_size((width, height), size, P) == (new_w, new_h)  # rotating the input rotates the target


@PROFILE
@given(height=sides, width=sides, size=exact_sizes)
def test_exact_sizes_ignore_the_input(height: int, width: int, size: tuple[int, int]) -> None:
    new_h, new_w = target_size((height, width), size, P)
    assert (new_h, new_w) == target_size((1, 1), size, P)
    assert abs(new_h - size[0]) <= P / 2 or new_h == P
    assert abs(new_w - size[1]) <= P / 2 or new_w == P


@PROFILE
@given(height=sides, width=sides, size=st.one_of(short_sizes, exact_sizes), bounds=limits)
def test_limits_refuse_exactly_the_targets_that_break_them(height: int, width: int, size, bounds: InputLimits) -> None:
    new_h, new_w = target_size((height, width), size, P)
    breaks = (
        max(new_h, new_w) > bounds.max_side
        or new_h * new_w > bounds.max_image_pixels
        or new_h * new_w > bounds.max_request_pixels
    )
    if breaks:
        with pytest.raises(ImageError, match=r"max_(side|image_pixels|request_pixels)="):
            target_size((height, width), size, P, limits=bounds)
    else:
        assert target_size((height, width), size, P, limits=bounds) == (new_h, new_w)


@PROFILE
@given(height=st.integers(-5, 0), width=st.integers(-5, 5))
def test_empty_sides_are_image_errors(height: int, width: int) -> None:
    with pytest.raises(ImageError, match="no pixels"):
        target_size((height, width), 224, P)
    with pytest.raises(ImageError, match="no pixels"):
        target_size((width, height), 224, P)


# --------------------------------------------------------------------------- decoding
images = st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([None, 1, 3, 4])).flatmap(
    lambda hwc: arrays(np.uint8, hwc[:2] if hwc[2] in (None, 1) else (*hwc[:2], hwc[2]))
)


@PROFILE
@given(array=images)
def test_png_decoding_is_lossless_for_grey_rgb_and_opaque_rgba(array: np.ndarray) -> None:
    if array.ndim == 3 and array.shape[2] == 4:
        array = array.copy()
        array[..., 3] = 255  # opaque: compositing onto white leaves the colour unchanged
    decoded = load_rgb(encode(_pil(array)))
    expected = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(load_rgb(array), expected)


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, "L" if array.ndim == 2 else ("RGB", "RGBA")[array.shape[2] - 3])


@PROFILE
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_image_error(data: bytes) -> None:
    _decodes_or_image_error(data)


_VALID = {
    fmt: encode(_pil(np.arange(16 * 20, dtype=np.uint8).reshape(16, 20)).convert("RGB"), fmt) for fmt in ("PNG", "JPEG")
}


@PROFILE
@given(
    fmt=st.sampled_from(sorted(_VALID)),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4),
)
def test_truncated_or_bit_flipped_files_decode_or_raise_image_error(fmt: str, cut: float, flips) -> None:
    data = bytearray(_VALID[fmt][: max(1, int(cut * len(_VALID[fmt])))])
    for where, mask in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= mask
    _decodes_or_image_error(bytes(data))


def _decodes_or_image_error(data: bytes) -> None:
    try:
        rgb = load_rgb(data)
    except ImageError:
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.size > 0


@PROFILE
@given(
    array=arrays(
        st.sampled_from([np.float32, np.float64, np.int32, np.uint16, np.bool_]),
        st.tuples(st.integers(1, 8), st.integers(1, 8), st.just(3)),
    )
)
def test_non_uint8_arrays_are_refused(array: np.ndarray) -> None:
    with pytest.raises(ImageError):
        load_rgb(array)


# --------------------------------------------------------------------------- masks
masks = arrays(
    st.sampled_from([np.uint8, np.uint16, np.int32, np.int64]),
    st.tuples(st.integers(1, 30), st.integers(1, 30)),
    elements=st.integers(0, 255),
)


@PROFILE
@given(mask=masks)
def test_valid_masks_keep_their_labels(mask: np.ndarray) -> None:
    labels = load_mask(mask)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, mask.astype(np.int64))
    np.testing.assert_array_equal(load_mask(encode(_pil(mask.astype(np.uint8)).convert("L"))), mask.astype(np.int64))


@PROFILE
@given(mask=masks, where=st.tuples(st.integers(0, 29), st.integers(0, 29)), value=st.integers(-(2**31), -1))
def test_negative_labels_are_refused(mask: np.ndarray, where: tuple[int, int], value: int) -> None:
    mask = mask.astype(np.int64)
    mask[where[0] % mask.shape[0], where[1] % mask.shape[1]] = value
    with pytest.raises(SupportSetError, match="negative"):
        load_mask(mask)


@PROFILE
@given(mask=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6))))
def test_float_masks_are_refused(mask: np.ndarray) -> None:
    with pytest.raises(SupportSetError, match="integer"):
        load_mask(mask)


@PROFILE
@given(mask=masks, size=st.tuples(st.integers(1, 60), st.integers(1, 60)))
def test_nearest_resize_keeps_labels_and_shape(mask: np.ndarray, size: tuple[int, int]) -> None:
    resized = resize_mask(mask.astype(np.int64), size)
    assert resized.shape == size
    assert set(np.unique(resized)) <= set(np.unique(mask))
    np.testing.assert_array_equal(resize_mask(mask, mask.shape), mask)
    if size[0] % mask.shape[0] == 0 and size[1] % mask.shape[1] == 0:  # integer upscaling is exact replication
        factor = (size[0] // mask.shape[0], size[1] // mask.shape[1])
        np.testing.assert_array_equal(resized, np.kron(mask, np.ones(factor, mask.dtype)))
