"""What the web page receives, made safe: bank names, uploaded support sets, zip archives.

Nothing uploaded is ever written to disk, so archive member names are only labels: a member
called `../../etc/passwd` is simply an image named "passwd". Bank names are a plain folder
name under the configured root, checked before any path is built from them.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from neco.client import BankError, ClientError, ImageError, SupportSetError, load_mask, load_rgb
from neco.client.retrieval import is_saved_bank
from neco.contract import IGNORE_INDEX
from neco.layout import CLASSES_FILE, IMAGE_SUFFIXES, IMAGES_DIR, MASKS_DIR

BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A saved bank is named by one folder name: no separators, no leading dot, so never `..`."""
COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
MASK_SUFFIXES: tuple[str, ...] = ("_mask", "-mask", ".mask")
"""A loose file `NAME_mask.png` is the mask of `NAME.<ext>`."""


class UploadTooLargeError(ClientError, ValueError):
    """A request exceeds one of the page's limits (bytes, unpacked bytes, images, pixels, classes)."""


class FormError(ClientError, ValueError):
    """A form that asks for nothing sensible (no query image; both or neither support source)."""


class UnknownBankError(BankError):
    """The requested bank is not a saved bank directly under the configured bank root."""


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the browser gave and its bytes."""

    name: str
    data: bytes


@dataclass
class PixelBudget:
    """The decoded pixels one request may cost: per image, and all its images and masks together.

    Every upload is charged from its header (Pillow reads only that on `open`) before anything
    is decoded, so a request over the budget costs no pixel memory at all.
    """

    max_image_pixels: int
    max_request_pixels: int
    used: int = 0

    def charge(self, upload: Upload, what: str) -> None:
        """Count `upload`'s declared pixels; an unreadable header is left to `decode` to report."""
        too_many = f"the page decodes at most {self.max_image_pixels:,} px per image (max_image_pixels)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit here is stricter
            try:
                with Image.open(io.BytesIO(upload.data)) as image:
                    width, height = image.size
            except Image.DecompressionBombError:  # beyond twice Pillow's own limit: refused on open
                raise UploadTooLargeError(f"{what} {upload.name!r} declares a gigantic size; {too_many}") from None
            except Exception:  # any header Pillow cannot read fails again in decode(), with its name
                return
        pixels = width * height
        if pixels > self.max_image_pixels:
            raise UploadTooLargeError(f"{what} {upload.name!r} is {width}x{height} = {pixels:,} px; {too_many}")
        self.used += pixels
        if self.used > self.max_request_pixels:
            raise UploadTooLargeError(
                f"the images and masks of this request come to more than {self.max_request_pixels:,} px "
                f"(max_request_pixels; {what} {upload.name!r} brings it to {self.used:,})"
            )


def list_banks(root: Path) -> list[str]:
    """Names of the saved banks directly under `root` (sorted; none if `root` does not exist)."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if BANK_NAME.fullmatch(p.name) and _inside(root, p) and is_saved_bank(p)
    )


def bank_folder(root: Path, name: str) -> Path:
    """The folder of bank `name` under `root`, refusing anything that is not one listed bank."""
    if not BANK_NAME.fullmatch(name):
        raise BankError(f"bank name {name[:80]!r} is not allowed: use the name of a folder under the bank root")
    folder = root / name
    if not _inside(root, folder) or not is_saved_bank(folder):
        raise UnknownBankError(
            f"there is no saved bank named {name!r} (banks: {', '.join(list_banks(root)) or 'none'})"
        )
    return folder


def _inside(root: Path, folder: Path) -> bool:
    """True when `folder` resolves (symlinks followed) to a direct child of `root`."""
    return folder.resolve().parent == root.resolve()


def expand_uploads(uploads: Sequence[Upload], max_unpacked_bytes: int) -> list[Upload]:
    """Loose files as they are, zip archives replaced by their members (bounded in total size)."""
    files: list[Upload] = []
    for upload in uploads:
        if PurePosixPath(upload.name).suffix.lower() == ".zip" or upload.data[:4] == b"PK\x03\x04":
            files.extend(_unzip(upload, max_unpacked_bytes))
        else:
            files.append(upload)
    return files


def _unzip(upload: Upload, max_unpacked_bytes: int) -> list[Upload]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(upload.data))
        members = [m for m in archive.infolist() if not m.is_dir() and not _hidden(m.filename)]
        declared = sum(m.file_size for m in members)
        if declared > max_unpacked_bytes:
            raise UploadTooLargeError(
                f"{upload.name!r} unpacks to {declared / 2**20:.1f} MiB, more than the "
                f"{max_unpacked_bytes / 2**20:.1f} MiB allowed (max_unpacked_mb)"
            )
        out, total = [], 0
        for member in members:
            with archive.open(member) as handle:  # read at most the budget: headers can lie
                data = handle.read(max_unpacked_bytes - total + 1)
            total += len(data)
            if total > max_unpacked_bytes:
                raise UploadTooLargeError(f"{upload.name!r} unpacks to more than max_unpacked_mb allows")
            out.append(Upload(member.filename, data))
        return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
        raise SupportSetError(f"{upload.name!r} is not a readable zip archive ({exc})") from None


def _hidden(name: str) -> bool:
    """macOS resource forks and dot files that archivers add next to the real files."""
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def support_pairs(
    uploads: Sequence[Upload], max_images: int, max_unpacked_bytes: int, budget: PixelBudget
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str] | None]:
    """Decode an uploaded support set into (image, mask) pairs and its class names (if given).

    Files come loose or in zip archives. A mask is recognised by its folder (`masks/NAME.png`,
    the layout of a support folder) or its name (`NAME_mask.png`); an image by `images/` or by
    being any other image file; `classes.json` names the classes. Images and masks pair up by
    NAME, and every image needs exactly one mask. Every file is charged to `budget` before the
    first one is decoded.
    """
    images: dict[str, Upload] = {}
    masks: dict[str, Upload] = {}
    class_names: list[str] | None = None
    for upload in expand_uploads(uploads, max_unpacked_bytes):
        path = PurePosixPath(upload.name.replace("\\", "/"))
        if path.name == CLASSES_FILE:
            class_names = _class_names(upload)
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise SupportSetError(f"{upload.name!r} is neither an image, a mask, {CLASSES_FILE} nor a zip archive")
        role, stem = _role(path)
        target = masks if role == "mask" else images
        if stem in target:
            raise SupportSetError(f"two support {role}s are named {stem!r} ({target[stem].name!r}, {upload.name!r})")
        target[stem] = upload
    if not images:
        raise SupportSetError("the support upload holds no images: add images with their masks (NAME_mask.png)")
    if len(images) > max_images:
        raise UploadTooLargeError(
            f"the support upload holds {len(images)} images; at most {max_images} are allowed (max_support_images)"
        )
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        name = unmatched[0]
        what = (
            f"image {images[name].name!r} has no mask" if name in images else f"mask {masks[name].name!r} has no image"
        )
        raise SupportSetError(f"{what}: name masks NAME_mask.png or put them in masks/ with the same NAME")
    stems = sorted(images)
    for stem in stems:
        budget.charge(images[stem], "support image")
        budget.charge(masks[stem], "support mask")
    limit = budget.max_image_pixels
    pairs = [(decode(images[s], "support image", limit), decode(masks[s], "support mask", limit)) for s in stems]
    return pairs, class_names


def _role(path: PurePosixPath) -> tuple[str, str]:
    """("image" | "mask", pairing name) of one file by its folder or its name."""
    parent = path.parent.name.lower()
    if parent == MASKS_DIR:
        return "mask", path.stem
    if parent != IMAGES_DIR:
        for suffix in MASK_SUFFIXES:
            if path.stem.lower().endswith(suffix) and len(path.stem) > len(suffix):
                return "mask", path.stem[: -len(suffix)]
    return "image", path.stem


def decode(upload: Upload, what: str, max_pixels: int) -> np.ndarray:
    """An uploaded image (RGB) or mask (labels) as an array; errors name the file as uploaded."""
    try:
        return load_mask(upload.data, max_pixels) if what.endswith("mask") else load_rgb(upload.data, max_pixels)
    except (ImageError, SupportSetError) as exc:  # the decoder knows only "bytes"; the user knows the name
        raise type(exc)(f"{what} {upload.name!r}: {exc}") from None


def _class_names(upload: Upload) -> list[str]:
    try:
        names = json.loads(upload.data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SupportSetError(f"{upload.name!r} is not valid JSON ({exc})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SupportSetError(f"{upload.name!r} must hold a non-empty JSON list of class-name strings")
    return names


def check_class_count(count: int, max_classes: int, source: str) -> None:
    """Refuse more classes than the page serves: label transfer's work grows with classes x patches."""
    if count > max_classes:
        raise UploadTooLargeError(
            f"{source} has {count:,} classes; the page serves at most {max_classes} (max_classes)"
        )


def check_label_transfer(patches: int, k: int, classes: int, max_bytes: int) -> None:
    """Refuse a label transfer whose (patches, k, classes) float32 gather would exceed `max_bytes`."""
    need = patches * k * classes * 4
    if need > max_bytes:
        raise UploadTooLargeError(
            f"k={k} neighbours x {classes} classes x {patches} query patches need {need / 2**20:,.2f} MiB for label "
            f"transfer; the page allows {max_bytes / 2**20:,.2f} MiB (max_transfer_mb): lower k"
        )


def inferred_class_count(masks: Sequence[np.ndarray]) -> int:
    """K a bank built without class names gets: the largest label (ignore excluded) + 1."""
    tops = [int(m[m != IGNORE_INDEX].max(initial=-1)) for m in masks]
    return max(tops, default=-1) + 1


def parse_class_names(text: str) -> list[str] | None:
    """Comma-separated class names typed on the page (None when the field is empty)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        return None
    if len(set(names)) != len(names):
        raise SupportSetError(f"a class name is given twice: {names}")
    return names


def parse_colours(text: str, count: int) -> np.ndarray | None:
    """The page's class colours ("#rrggbb, ...") as (count, 3) uint8, or None when not given for every class.

    The page sends its own colours so that the overlay and the page's one legend agree; a list of
    another length (a saved bank with other classes) falls back to the client's palette.
    """
    given = [part.strip() for part in text.split(",") if part.strip()]
    if len(given) != count:
        return None
    bad = [c for c in given if not COLOUR.fullmatch(c)]
    if bad:
        raise FormError(f"class colours are written #rrggbb, got {bad[0][:20]!r}")
    return np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in given], dtype=np.uint8)
