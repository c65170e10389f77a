"""Decoding and resizing of images and label masks: the client's ONE resize policy.

Resize policy (used for the bank, for queries and by the evaluation stage):

* `size=S` (an int): scale the image so that its *shorter* side becomes S, keeping the aspect
  ratio, then round *each* side to the nearest multiple of the patch size (at least one patch).
  The aspect ratio is therefore kept up to at most half a patch per side.
* `size=(H, W)`: resize to exactly H x W, each side rounded to the nearest patch multiple
  (what the Hummingbird protocol does with 448 x 448).

The whole image is resized (no crop, no padding), so the patch grid covers the full input:
patch (i, j) sees resized pixels [i*p, (i+1)*p) x [j*p, (j+1)*p), i.e. original pixels
scaled by `PreparedImage.scale`. Images are resized with Pillow's bicubic filter (antialiased
when shrinking); masks with nearest neighbour so that labels are never blended.

Size limits are enforced before anything large is allocated: an encoded image's header is
read first (Pillow opens lazily) and refused when it declares more than `max_decoded_pixels`
(a decompression bomb) or when the policy would resize it beyond the request limits
(`neco.signature.InputLimits`: a 10,000 x 20 strip at `size=448` would become 224,000 x 448).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from neco.client.errors import ImageError, SupportSetError
from neco.signature import DEFAULT_LIMITS, InputLimits

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""Anything `load_rgb` accepts: a file path, encoded bytes, a PIL image or a uint8 array."""

SizeSpec = Union[int, tuple[int, int]]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = ("I", "F")  # "I", "I;16", "I;16B", ... and 32-bit float

DEFAULT_MAX_DECODED_PIXELS = 64 * 1024 * 1024
"""Largest H x W an encoded image may declare (64 MP, 192 MB as RGB) before it is decoded.

Larger than any request (`InputLimits`) because photos are shrunk by the policy before they
are sent; below Pillow's own decompression-bomb threshold (~89 MP), so Pillow's warning is
never the first thing a user sees."""

SizeCheck = Callable[[tuple[int, int]], object]
"""Called with an image's declared (height, width) before its pixels are decoded."""


@dataclass(frozen=True)
class PreparedImage:
    """An image resized by the policy above, plus how its patches map to the input pixels."""

    array: np.ndarray
    """H x W x 3 uint8 RGB, H and W multiples of `patch_size`: what the encoder sees."""
    original_size: tuple[int, int]
    """(height, width) of the decoded input (after EXIF orientation)."""
    grid: tuple[int, int]
    """(rows, cols) of the patch grid: the (h, w) of the dense features."""
    patch_size: int
    """Pixels per patch side of the model the image was prepared for (its contract's)."""
    original: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The decoded input, kept so that overlays need not decode it again (`array` when not resized)."""

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the resized array."""
        return self.array.shape[0], self.array.shape[1]

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per resized pixel, (vertical, horizontal)."""
        return self.original_size[0] / self.size[0], self.original_size[1] / self.size[1]

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) in original-image pixels covered by patch (row, col)."""
        if not (0 <= row < self.grid[0] and 0 <= col < self.grid[1]):
            raise IndexError(f"patch ({row}, {col}) outside the {self.grid[0]}x{self.grid[1]} grid")
        sy, sx = self.scale
        p = self.patch_size
        return row * p * sy, col * p * sx, (row + 1) * p * sy, (col + 1) * p * sx


def target_size(
    original_size: tuple[int, int], size: SizeSpec, patch_size: int, limits: InputLimits | None = None
) -> tuple[int, int]:
    """Apply the resize policy to an (H, W) and return the encoder input (H', W').

    `patch_size` is the model's (`ModelContract.patch_size`): sides snap to its multiples.

    With `limits`, a target that one request could not carry raises `ImageError` naming the
    limit, so a caller can refuse an image from its header before decoding or resizing it.
    """
    height, width = original_size
    if height <= 0 or width <= 0:
        raise ImageError(f"image of size {height}x{width} has no pixels")
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        goal_h, goal_w = float(size[0]), float(size[1])
    else:
        if int(size) <= 0:
            raise ValueError(f"size must be positive, got {size!r}")
        factor = int(size) / min(height, width)
        goal_h, goal_w = height * factor, width * factor

    def snap(value: float) -> int:
        return max(patch_size, int(round(value / patch_size)) * patch_size)

    target = snap(goal_h), snap(goal_w)
    if limits is not None:
        _check_target(original_size, size, target, limits)
    return target


def _check_target(original: tuple[int, int], size: SizeSpec, target: tuple[int, int], limits: InputLimits) -> None:
    """Refuse a resize target larger than one request may be (the server's limits, client-side)."""
    new_h, new_w = target
    pixels = new_h * new_w
    if max(target) > limits.max_side:
        broken = f"its side {max(target)} px exceeds max_side={limits.max_side}"
    elif pixels > limits.max_image_pixels:
        broken = f"{pixels} px exceeds max_image_pixels={limits.max_image_pixels}"
    elif pixels > limits.max_request_pixels:
        broken = f"{pixels} px exceeds max_request_pixels={limits.max_request_pixels}"
    else:
        return
    raise ImageError(
        f"image of {original[0]}x{original[1]} px would be resized to {new_h}x{new_w} for size={size!r}, "
        f"but {broken}; use a smaller size or crop the image"
    )


def prepare_image(
    image_like: ImageLike | np.ndarray,
    size: SizeSpec,
    patch_size: int,
    limits: InputLimits | None = DEFAULT_LIMITS,
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
) -> PreparedImage:
    """Decode `image_like` to RGB and resize it by the policy; see the module docstring.

    The resize target is checked against `limits` from the image's header before decoding
    (and again after EXIF orientation), so an image a request cannot carry costs no memory.
    `limits=None` turns the check off.
    """

    def fits(declared: tuple[int, int]) -> None:
        # the pixel and side limits are symmetric, so an EXIF rotation cannot change the verdict
        target_size(declared, size, patch_size, limits)

    original = _load_rgb(image_like, max_decoded_pixels, fits)
    height, width = original.shape[:2]
    new_h, new_w = target_size((height, width), size, patch_size, limits)
    rgb = original
    if (new_h, new_w) != (height, width):
        rgb = np.asarray(Image.fromarray(original).resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    return PreparedImage(
        array=np.ascontiguousarray(rgb),
        original_size=(height, width),
        grid=(new_h // patch_size, new_w // patch_size),
        patch_size=patch_size,
        original=original,
    )


def describe(image_like: object) -> str:
    """A short human name for an input, used in error messages."""
    if isinstance(image_like, (str, os.PathLike)):
        return f"image file {str(image_like)!r}"
    if isinstance(image_like, np.ndarray):
        return f"array of shape {image_like.shape} and dtype {image_like.dtype}"
    if isinstance(image_like, Image.Image):
        return f"PIL image ({image_like.mode}, {image_like.size[0]}x{image_like.size[1]})"
    if isinstance(image_like, (bytes, bytearray, memoryview)):
        return f"{len(image_like)} bytes of image data"
    return f"object of type {type(image_like).__name__}"


@contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Turn Pillow's many failure types into one ImageError each (bombs included)."""
    with warnings.catch_warnings():
        # Pillow only warns between its threshold and twice it; here every bomb is an error
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image format Pillow can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name} is refused as a decompression bomb: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise ImageError(f"{name} could not be decoded (truncated or corrupt?): {exc}") from None


def _open(
    image_like: ImageLike, what: str, max_pixels: int = DEFAULT_MAX_DECODED_PIXELS, check: SizeCheck | None = None
) -> Image.Image:
    """Open a path / bytes / PIL input, check its declared size, then decode it fully.

    Pillow reads only the header on `Image.open`, so `max_pixels` and `check` (called with the
    declared (height, width)) refuse an oversized image before its pixels are allocated.
    """
    name = describe(image_like)
    if isinstance(image_like, Image.Image):
        source: object = None
    elif isinstance(image_like, (str, os.PathLike)):
        path = Path(image_like)
        if not path.is_file():
            raise ImageError(f"{what} file {str(path)!r} does not exist")
        source = path
    elif isinstance(image_like, (bytes, bytearray, memoryview)):
        if len(image_like) == 0:
            raise ImageError(f"{what} bytes are empty")
        source = io.BytesIO(bytes(image_like))
    else:
        raise ImageError(f"cannot read a {what} from {name}; pass a path, bytes, a PIL image or a numpy array")
    with _decoding(name):
        image = image_like if source is None else Image.open(source)  # type: ignore[arg-type]
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{name} declares {width}x{height} = {width * height} px, more than "
                f"max_decoded_pixels={max_pixels}; refused before decoding (decompression bomb?)"
            )
        if check is not None:
            check((height, width))
        # Pillow silently narrows 16-bit-per-channel colour PNGs to 8-bit "RGB"; only the
        # not-yet-decoded tile's raw mode still says ";16".
        sixteen_bit = any(";16" in str(getattr(tile, "args", "")) for tile in getattr(image, "tile", None) or [])
        with _decoding(name):
            image.load()
    except BaseException:
        if source is not None:
            image.close()
        raise
    if sixteen_bit:
        raise ImageError(f"{name} has 16 bits per channel; convert it to 8-bit RGB first")
    return image


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name} has no pixels")
    if image.mode.startswith(_HIGH_DEPTH_MODES):
        raise ImageError(f"{name} has mode {image.mode!r} (16/32-bit); convert it to 8-bit RGB first")
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        # Transparent pixels have arbitrary colour values; composite onto white so that what
        # the encoder sees is what an image viewer on a white page shows.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name} (mode {image.mode!r}) cannot be converted to RGB: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    name = describe(array)
    if array.size == 0:
        raise ImageError(f"{name} has no pixels")
    if array.dtype == np.uint16:
        raise ImageError(f"{name} is 16-bit; scale it to uint8 first")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageError(f"{name} holds NaN or inf values; expected uint8 pixel values (0-255)")
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: expected uint8 pixel values (0-255)")
    if array.ndim == 2:
        return np.ascontiguousarray(np.repeat(array[:, :, None], 3, axis=2))
    if array.ndim == 3 and array.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array)
    if array.ndim == 3 and array.shape[2] == 4:
        return _pil_to_rgb(Image.fromarray(array, mode="RGBA"), name)
    raise ImageError(f"{name}: expected HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA)")


def load_rgb(image_like: ImageLike, max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> np.ndarray:
    """Decode any supported input to an H x W x 3 uint8 RGB array (EXIF orientation applied)."""
    return _load_rgb(image_like, max_decoded_pixels, None)


def _load_rgb(image_like: ImageLike, max_pixels: int, check: SizeCheck | None) -> np.ndarray:
    if isinstance(image_like, np.ndarray):
        return _array_to_rgb(image_like)
    return _pil_to_rgb(_open(image_like, "image", max_pixels, check), describe(image_like))


def load_mask(mask_like: ImageLike, max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> np.ndarray:
    """Decode a label mask to an H x W int64 array (values are class indices, 255 = ignore).

    Palette PNGs (Pascal VOC style) give their indices, not their colours; colour masks are
    rejected because their colour-to-class mapping is unknown.
    """
    name = describe(mask_like)
    if isinstance(mask_like, np.ndarray):
        array = mask_like
    else:
        image = ImageOps.exif_transpose(_open(mask_like, "mask", max_decoded_pixels))
        if image.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
            raise SupportSetError(f"mask {name} has mode {image.mode!r}; expected a single-channel label image")
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2 or array.size == 0:
        raise SupportSetError(f"mask {name} must be a non-empty HxW array of class indices")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise SupportSetError(f"mask {name} must hold integer class indices, not {array.dtype}")
    labels = array.astype(np.int64)
    if labels.min() < 0:
        raise SupportSetError(f"mask {name} holds negative labels ({int(labels.min())})")
    return labels


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer mask to (height, width)."""
    if mask.shape == size:
        return mask
    # Nearest neighbour via index maps (pixel centres, half-pixel convention): exact for any
    # label value, unlike PIL modes limited to 8/16/32 bits.
    rows = np.minimum(((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]
