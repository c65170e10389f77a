"""Generated scenes: determinism, label range, mask/image agreement and on-disk layout."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from neco.scenes import SCENE_CLASSES, TEXTURE_CLASSES, generate_scene, texture_scene, write_scene_dataset


def test_scene_is_deterministic_and_well_formed():
    a_img, a_mask = generate_scene(np.random.default_rng(7), size=(98, 140), num_classes=5)
    b_img, b_mask = generate_scene(np.random.default_rng(7), size=(98, 140), num_classes=5)
    assert a_img.shape == (98, 140, 3) and a_img.dtype == np.uint8
    assert a_mask.shape == (98, 140) and a_mask.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert set(np.unique(a_mask)) <= set(range(5))


def test_objects_differ_in_colour_from_background():
    """Each labelled region's mean colour is far from the background's: the mask is visible."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        img, mask = generate_scene(rng, size=(112, 112), num_classes=4)
        bg = img[mask == 0].reshape(-1, 3).mean(0)
        for label in set(np.unique(mask)) - {0}:
            region = img[mask == label].reshape(-1, 3)
            if len(region) > 50:
                seen.add(int(label))
                assert np.abs(region.mean(0) - bg).max() > 20
    assert seen == {1, 2, 3}


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_classes"):
        generate_scene(rng, num_classes=1)
    with pytest.raises(ValueError, match="size"):
        generate_scene(rng, size=(4, 4))


def test_dataset_layout(tmp_path):
    root = write_scene_dataset(tmp_path, splits={"train": 3, "val": 2}, size=(56, 70), num_classes=3, seed=1)
    assert json.loads((root / "classes.json").read_text()) == list(SCENE_CLASSES[:3])
    for split, n in (("train", 3), ("val", 2)):
        images = sorted((root / split / "images").glob("*.png"))
        masks = sorted((root / split / "masks").glob("*.png"))
        assert [p.name for p in images] == [p.name for p in masks] and len(images) == n
        img, mask = np.asarray(Image.open(images[0])), np.asarray(Image.open(masks[0]))
        assert img.shape == (56, 70, 3) and mask.shape == (56, 70) and mask.max() < 3


def test_default_family_is_unchanged():
    """Existing callers keep bit-identical scenes: `family="shapes"` is the default and draws the same."""
    a = generate_scene(np.random.default_rng(3), size=(64, 80), num_classes=5)
    b = generate_scene(np.random.default_rng(3), size=(64, 80), num_classes=5, family="shapes")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    digest = hashlib.sha256()
    for seed in range(5):
        image, mask = generate_scene(np.random.default_rng(seed), size=(112, 140), num_classes=5)
        digest.update(image.tobytes())
        digest.update(mask.tobytes())
    # the digest of the original generator (before the textures family existed)
    assert digest.hexdigest() == "2bbc2c9ed605bb5790cfb104fede1f4993d5111fa334d022b01d4bd57f54c642"


def _texture_scenes(count: int, num_classes: int = 6, size: int = 112):
    rng = np.random.default_rng(11)
    return [generate_scene(rng, size=(size, size), num_classes=num_classes, family="textures") for _ in range(count)]


def _erode(region: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        region = region[1:-1, 1:-1] & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
        region = np.pad(region, 1)
    return region


def _chroma_by_class(scenes) -> dict[int, np.ndarray]:
    """Per class, one row per region: its mean chromaticity (r, g, b) / (r + g + b)."""
    values: dict[int, list[np.ndarray]] = {}
    for image, mask in scenes:
        for label in np.unique(mask):
            region = image[mask == label].reshape(-1, 3).astype(np.float64)
            if len(region) > 100:
                mean = region.mean(0)
                values.setdefault(int(label), []).append(mean / mean.sum())
    return {k: np.stack(v) for k, v in sorted(values.items())}


def _colour_classifier_accuracy(by_class: dict[int, np.ndarray]) -> float:
    """Leave-nothing-out nearest-class-centre accuracy from chromaticity alone."""
    centres = np.stack([v.mean(0) for v in by_class.values()])
    hits = sum(
        int((np.argmin(((v[:, None] - centres[None]) ** 2).sum(-1), 1) == i).sum())
        for i, v in enumerate(by_class.values())
    )
    return hits / sum(len(v) for v in by_class.values())


def test_textures_colour_is_independent_of_class():
    """Per-class colour statistics overlap: no class owns a colour, unlike the shapes family."""
    textures = _chroma_by_class(_texture_scenes(80))
    assert set(textures) == set(range(6))
    spread = np.mean([v.std(0).mean() for v in textures.values()])
    centres = np.stack([v.mean(0) for v in textures.values()])
    assert np.abs(centres[:, None] - centres[None]).max() < spread  # centres closer than one class's spread
    rng = np.random.default_rng(11)
    shapes = _chroma_by_class([generate_scene(rng, size=(112, 112), num_classes=6) for _ in range(80)])
    assert _colour_classifier_accuracy(shapes) > 0.8  # the old family: colour gives the class away
    assert _colour_classifier_accuracy(textures) < 0.4  # chance is 1/6


def test_textures_masks_are_exact():
    """Every mask pixel carries its class's texture: stripe direction and flatness, read from the image."""
    for image, mask in _texture_scenes(30):
        grey = image.astype(np.float64).mean(-1)
        dy, dx = np.abs(np.diff(grey, axis=0))[:, :-1], np.abs(np.diff(grey, axis=1))[:-1, :]
        for label in np.unique(mask):
            inner = _erode(mask == label, 3)[:-1, :-1]
            if inner.sum() < 150:
                continue
            vy, vx = dy[inner].mean(), dx[inner].mean()
            if label == 0:  # soft blotches: no pattern
                assert max(vy, vx) < 6
            elif label == 1:  # horizontal stripes change along y
                assert vy > 3 * vx and vy > 6
            elif label == 2:  # vertical stripes change along x
                assert vx > 3 * vy and vx > 6
            else:  # dots, checker, diagonal stripes: both directions
                assert min(vy, vx) > 4
        # labels only come from the painted classes, and the background is where nothing was painted
        assert set(np.unique(mask)) <= set(range(6))


def test_textures_family_on_disk_and_errors(tmp_path):
    root = write_scene_dataset(tmp_path, {"train": 2}, size=(56, 56), num_classes=4, seed=0, family="textures")
    assert json.loads((root / "classes.json").read_text()) == list(TEXTURE_CLASSES[:4])
    with pytest.raises(ValueError, match="family"):
        generate_scene(np.random.default_rng(0), family="stars")
    with pytest.raises(ValueError, match="family"):
        write_scene_dataset(tmp_path / "bad", {"train": 1}, family="stars")
    assert not (tmp_path / "bad").exists()


def _inside_convex(py: np.ndarray, px: np.ndarray, corners: list[tuple[float, float]]) -> np.ndarray:
    """Pixel centres on the inner side of every edge of a convex polygon (corners counter-clockwise or not)."""
    sides = []
    for (ay, ax), (by, bx) in zip(corners, corners[1:] + corners[:1]):
        sides.append((bx - ax) * (py - ay) - (by - ay) * (px - ax))
    sides = np.stack(sides)
    return (sides >= 0).all(0) | (sides <= 0).all(0)


def _rasterise(obj, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """The object's footprint from its corners / foci in image space: a construction independent of
    the generator's rotated-frame inequalities."""
    c, s, r = np.cos(obj.angle), np.sin(obj.angle), obj.r

    def to_image(ry: float, rx: float) -> tuple[float, float]:  # shape frame -> image (inverse rotation)
        return obj.cy + c * ry + s * rx, obj.cx - s * ry + c * rx

    kind = (obj.label - 1) % 5
    if kind == 0:
        return np.hypot(py - obj.cy, px - obj.cx) <= r
    if kind == 3:  # ellipse: semi-axes 0.55 r (ry) and r (rx): sum of distances to the foci <= 2 r
        focus = np.sqrt(r**2 - (0.55 * r) ** 2)
        (f1y, f1x), (f2y, f2x) = to_image(0.0, focus), to_image(0.0, -focus)
        return np.hypot(py - f1y, px - f1x) + np.hypot(py - f2y, px - f2x) <= 2 * r
    corners = {
        1: [(-0.8 * r, -r), (-0.8 * r, r), (0.8 * r, r), (0.8 * r, -r)],  # box
        2: [(-r, 0.0), (0.6 * r, 0.96 * r), (0.6 * r, -0.96 * r)],  # triangle
        4: [(-r, 0.0), (0.0, r), (r, 0.0), (0.0, -r)],  # diamond
    }[kind]
    return _inside_convex(py, px, [to_image(*corner) for corner in corners])


def test_textures_masks_equal_an_independent_rasterisation():
    """Pixel for pixel: painting the objects' own geometry in order, occluding, gives the mask exactly."""
    rng = np.random.default_rng(4)
    labels_seen = set()
    for _ in range(40):
        image, mask, objects = texture_scene(rng, (96, 120), num_classes=6, max_objects=4)
        py, px = np.mgrid[0:96, 0:120].astype(np.float64)
        expected = np.zeros_like(mask)
        for obj in objects:
            expected[_rasterise(obj, py, px)] = obj.label
            labels_seen.add(obj.label)
        mismatched = int((expected != mask).sum())
        assert mismatched == 0, f"{mismatched} mask pixels differ from the objects' geometry"
    assert labels_seen == {1, 2, 3, 4, 5}
