"""The page's work: a memory bank (saved, or built from painted supports), then every query segmented.

Each result is what `client.segment(query, bank)` computes (the same features, the same label
transfer), plus the pictures the page shows and what it needs to be honest about them: the size
the encoder ran at, the patch grid, k, and a note when the confidence is low or the query's scale
differs from the support's. The pictures carry no legend of their own: the page draws one.
"""

from __future__ import annotations

import base64
import io
import secrets
import statistics
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neco.app.config import AppConfig
from neco.app.inputs import (
    PixelBudget,
    Upload,
    bank_folder,
    check_class_count,
    check_label_transfer,
    decode,
    inferred_class_count,
    parse_class_names,
    parse_colours,
    support_pairs,
)
from neco.client import BankError, FeatureBackend, MemoryBank, SupportSetError, batch_features, features_to_rgb
from neco.client.backend import prepare_for
from neco.client.images import SizeSpec, resize_mask
from neco.client.render import heat_colours, palette
from neco.client.retrieval import SegmentationResult, check_contract, segment_features

Connect = Callable[[], FeatureBackend]
"""Makes the feature backend on first use (a `NecoClient`; tests pass another backend)."""

PREVIEW_SIDE = 1024
"""Longest side of the overlay, confidence and PCA pictures: the page shows them at most that wide,
and blending colours costs tens of bytes per pixel. The mask PNG keeps the query's full size."""
LOW_CONFIDENCE = 0.5
"""Mean confidence below which a result comes with a note saying what may be wrong."""
SCALE_MISMATCH = 1.5
"""A query whose shorter side differs from the support's by more than this factor gets a note."""
BANK_DOWNLOADS = 8
"""Banks built from painted supports kept for their download link (the most recent ones)."""


@dataclass(frozen=True)
class Bank:
    """A bank and what the page says about it: its name, size policy, the support's own size."""

    memory: MemoryBank
    label: str
    download: str
    support_side: int | None
    """Median shorter side of the support images (None for a saved bank: not recorded)."""


def policy_text(size: SizeSpec) -> str:
    """The resize policy in words: an int scales the shorter side, a pair is exact."""
    if isinstance(size, (tuple, list)):
        return f"{size[0]}x{size[1]} px"
    return f"shorter side {size} px"


def policy_side(size: SizeSpec) -> int:
    return int(min(size)) if isinstance(size, (tuple, list)) else int(size)


class Segmenter:
    """The backend (connected on first use), saved banks (a small cache), recent built banks.

    Requests are served one at a time: a segmentation is CPU-bound numpy and faiss work plus
    one inference per query, and a lock keeps the caches and the backend free of races.
    """

    def __init__(self, config: AppConfig, connect: Connect) -> None:
        self.config = config
        self._connect = connect
        self._backend: FeatureBackend | None = None
        self._banks: OrderedDict[str, tuple[tuple[int, int], MemoryBank]] = OrderedDict()
        self._built: OrderedDict[str, MemoryBank] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def backend(self) -> FeatureBackend:
        if self._backend is None:
            self._backend = self._connect()
        return self._backend

    def saved_bank(self, name: str) -> MemoryBank:
        """Bank `name`, loaded (and checksummed) again only when it was rewritten.

        A bank is written by publishing a whole new folder in its place, so the folder's inode
        and mtime change with every write. Errors name the bank, never the server's path to it.
        """
        folder = bank_folder(self.config.banks, name)
        status = folder.stat()
        stamp = (status.st_ino, status.st_mtime_ns)
        cached = self._banks.get(name)
        if cached is not None and cached[0] == stamp:
            self._banks.move_to_end(name)
            return cached[1]
        contract = self.backend.contract
        try:
            bank = MemoryBank.load(folder, contract=contract)
        except BankError as exc:
            raise type(exc)(without_path(str(exc), folder, name)) from None
        check_class_count(len(bank.class_names), self.config.max_classes, f"bank {name!r}")
        if self.config.bank_cache > 0:
            self._banks[name] = (stamp, bank)
            while len(self._banks) > self.config.bank_cache:
                self._banks.popitem(last=False)
        return bank

    def named_bank(self, name: str, size: int | None) -> Bank:
        """A saved bank; a size other than the bank's own policy is refused, naming both."""
        memory = self.saved_bank(name)
        if size is not None and size != memory.image_size:
            raise SupportSetError(
                f"size {size} px was asked but bank {name!r} was built at {policy_text(memory.image_size)}: "
                f"set the size to auto to use the bank's, or rebuild the bank at {size}"
            )
        return Bank(memory, f"saved bank {name!r}", f"api/banks/{name}.zip", None)

    def uploaded_bank(self, uploads: list[Upload], classes: str, size: int | None, budget: PixelBudget) -> Bank:
        """A bank built from uploaded or painted supports, at `size` or the support images' own size."""
        config = self.config
        typed = parse_class_names(classes)
        if typed is not None:
            check_class_count(len(typed), config.max_classes, "the class list")
        pairs, listed = support_pairs(uploads, config.max_support_images, config.max_unpacked_bytes, budget)
        names = typed or listed
        count = len(names) if names else inferred_class_count([mask for _, mask in pairs])
        check_class_count(count, config.max_classes, "the support set")
        own = round(statistics.median(min(image.shape[:2]) for image, _ in pairs))
        policy: SizeSpec = size if size is not None else (config.size if config.size is not None else own)
        memory = MemoryBank.build(self.backend, pairs, class_names=names, image_size=policy)
        token = secrets.token_hex(8)
        self._built[token] = memory
        while len(self._built) > BANK_DOWNLOADS:
            self._built.popitem(last=False)
        label = f"{len(pairs)} support image{'s' if len(pairs) > 1 else ''}"
        return Bank(memory, label, f"api/bank/{token}.zip", own)

    def built_bank_zip(self, token: str) -> bytes | None:
        """The zip of a recently built bank (None once it has left the cache)."""
        memory = self._built.get(token)
        if memory is None:
            return None
        with tempfile.TemporaryDirectory(prefix="neco-app-bank-") as scratch:
            return zip_folder(memory.save(Path(scratch) / "bank"), "bank")

    def segment(
        self, query: Upload, bank: Bank, k: int, temperature: float, colours: str, upsample: str
    ) -> dict[str, Any]:
        """What `client.segment(query, bank)` computes, plus the pictures and the notes the page shows."""
        backend, memory = self.backend, bank.memory
        check_contract(backend.contract, memory)
        rgb = decode(query, "query image", self.config.max_image_pixels)
        prepared = prepare_for(backend, rgb, memory.image_size)  # within the backend's own limits
        patches = prepared.grid[0] * prepared.grid[1]
        check_label_transfer(patches, k, len(memory.class_names), self.config.max_transfer_bytes)
        features = batch_features(backend, [prepared.array])[0]
        result = segment_features(
            features, memory, prepared.original_size, k=k, temperature=temperature, upsample=upsample, guide=rgb
        )  # what segment() computes, with the same upsampler
        labels, counts = np.unique(result.mask, return_counts=True)
        confidence = float(result.confidence.mean())
        return {
            "name": query.name,
            "mask": png_data_url(result.mask_image()),
            **previews(rgb, result, features, colours),
            "legend": [
                {"name": result.class_names[c], "colour": hex_colour(colours[c]), "share": n / result.mask.size}
                for c, n in zip(labels.tolist(), counts.tolist())
            ],
            "size": list(prepared.original_size),
            "input_size": list(prepared.size),
            "grid": list(prepared.grid),
            "classes": result.class_names,
            "mean_confidence": confidence,
            "upsample": result.upsample,
            "notes": notes(prepared.original_size, bank, confidence),
        }


def class_colours(text: str, count: int) -> np.ndarray:
    """The page's colours when it sent one per class, else the client's palette (saved banks)."""
    given = parse_colours(text, count)
    return given if given is not None else palette(count)


def notes(original: tuple[int, int], bank: Bank, confidence: float) -> list[str]:
    """Why a result may be wrong, in words: a scale the support never showed, a low confidence."""
    side, encoder = min(original), policy_side(bank.memory.image_size)
    reference = bank.support_side or encoder
    said = []
    if max(side / reference, reference / side) > SCALE_MISMATCH:
        support = f"support images at {bank.support_side} px, " if bank.support_side else ""
        said.append(
            f"query at {side} px, {support}bank at {encoder} px: the query was resized {side / encoder:.2g}x, "
            "so its objects may appear at another scale than the support's; try a size that matches the objects"
        )
    if confidence < LOW_CONFIDENCE:
        said.append(
            f"low confidence ({confidence:.2f}): the query may show classes or looks the support lacks; "
            "paint more of them, or another support image"
        )
    return said


def hex_colour(rgb: np.ndarray) -> str:
    return "#" + bytes(np.asarray(rgb, dtype=np.uint8).tolist()).hex()


def previews(rgb: np.ndarray, result: SegmentationResult, features: np.ndarray, colours: np.ndarray) -> dict[str, str]:
    """The overlay, confidence and PCA pictures without legends, shrunk to `PREVIEW_SIDE` for large queries."""
    height, width = result.mask.shape
    scale = min(1.0, PREVIEW_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    mask, confidence = result.mask, result.confidence
    if size != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.Resampling.BILINEAR))
        mask = resize_mask(mask, size)
        confidence = np.asarray(Image.fromarray(confidence).resize(size[::-1], Image.Resampling.BILINEAR))
    valid = mask < len(colours)
    tint = np.zeros_like(rgb)
    tint[valid] = colours[mask[valid]]
    return {
        "query": png_data_url(Image.fromarray(rgb)),
        "overlay": png_data_url(blend(rgb, tint, valid)),
        "confidence": png_data_url(blend(rgb, heat_colours(confidence), np.ones(size, dtype=bool))),
        "pca": png_data_url(features_to_rgb(features, size=size)),
    }


def blend(rgb: np.ndarray, colours: np.ndarray, where: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """`colours` over `rgb` at `alpha` where `where` is set (the picture's own pixels elsewhere)."""
    mixed = rgb.astype(np.float32)
    mixed[where] = (1 - alpha) * mixed[where] + alpha * colours[where].astype(np.float32)
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8))


def zip_folder(folder: Path, top: str) -> bytes:
    """A folder's files as a zip in memory, under one top folder (unzip, then load it by that name)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


def without_path(message: str, folder: Path, name: str) -> str:
    """`message` with the server's path to a bank replaced by the bank's name."""
    for path in (str(folder.resolve()), str(folder)):
        message = message.replace(path, name)
    return message


def png_data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
