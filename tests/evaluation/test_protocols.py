"""The published Hummingbird protocol against an independent computation written from its facts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neco.evaluation.augment import SquareViews, crop_box
from neco.evaluation.matching import matched_miou
from neco.evaluation.metrics import iou_from_confusion
from neco.evaluation.protocols import (
    UNLABELLED_SCORE,
    ProtocolError,
    hbird_eval,
    memory_labels,
    memory_scores,
    select_memory,
)

PATCH, GRID, DIM, CLASSES = 4, 4, 8, 4


def _reference_miou(bank, queries, num_classes: int, k: int, temperature: float, budget: int | None = None) -> float:
    """Loops and brute force: 255 -> 0 one-hot means, exact k-NN, torch bilinear, best permutation.

    With `budget`, each image keeps the patches of smallest score: sum over the patch's classes of the
    number of the image's patches holding the class, times U(0, 1) drawn image after image (seed 0).
    """
    feats, labels = [], []
    rng = np.random.default_rng(0)
    for f, mask in bank:
        mask = np.where(mask == 255, 0, mask)
        image_feats, image_labels = [], []
        for r in range(GRID):
            for c in range(GRID):
                image_feats.append(f[r, c])
                pix = mask[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].ravel()
                image_labels.append([np.mean(pix == cls) for cls in range(num_classes)])
        if budget is not None:
            holding = [sum(1 for lab in image_labels if lab[cls] > 0) for cls in range(num_classes)]
            score = [sum(holding[cls] for cls in range(num_classes) if lab[cls] > 0) for lab in image_labels]
            score = np.array(score, dtype=np.float64) * rng.random(len(score))  # every patch here is labelled
            keep = sorted(range(len(score)), key=lambda i: (score[i], i))[:budget]
            image_feats, image_labels = [image_feats[i] for i in keep], [image_labels[i] for i in keep]
        feats += image_feats
        labels += image_labels
    feats, labels = np.array(feats, dtype=np.float64), np.array(labels)
    confusion = np.zeros((num_classes, num_classes))
    for f, mask in queries:
        q = f.reshape(-1, DIM).astype(np.float64)
        sims = q @ feats.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        s = np.take_along_axis(sims, top, axis=1) / temperature
        w = np.exp(s - s.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        scores = np.einsum("qk,qkc->qc", w, labels[top]).T.reshape(1, num_classes, GRID, GRID)
        up = F.interpolate(torch.from_numpy(scores), size=mask.shape, mode="bilinear", align_corners=False)
        pred = up[0].argmax(0).numpy()
        for t, p in zip(mask.ravel(), pred.ravel()):
            if t != 255:
                confusion[t, p] += 1
    best = -1.0
    for perm in itertools.permutations(range(num_classes)):  # perm[p] = class of label p
        m = np.zeros_like(confusion)
        for p in range(num_classes):
            m[:, perm[p]] += confusion[:, p]
        tp = np.diag(m)
        ious = tp / np.maximum(m.sum(0) + m.sum(1) - tp, 1e-8)
        pair = sum(
            confusion[perm[p], p] / max(confusion[perm[p]].sum() + confusion[:, p].sum() - confusion[perm[p], p], 1e-30)
            for p in range(num_classes)
        )
        if pair > best + 1e-12:
            best, miou = pair, ious.mean()
    return float(miou)


def _problem(seed: int, swap: bool):
    """Bank images whose patch features encode the patch's majority class (+ noise)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(CLASSES, DIM))

    def image(permute: bool):
        cells = rng.integers(0, CLASSES, (GRID, GRID))
        mask = np.kron(cells, np.ones((PATCH, PATCH), dtype=np.int64)).astype(np.uint8)
        mask[rng.random(mask.shape) < 0.1] = rng.integers(0, CLASSES)  # label noise inside patches
        mask[:, :1] = 255  # an ignore band, as VOC's object borders
        f = protos[cells] + 0.3 * rng.normal(size=(GRID, GRID, DIM))
        f /= np.linalg.norm(f, axis=-1, keepdims=True)
        if permute:  # the query split names classes differently: Hungarian must undo it
            mask = np.where(mask == 255, 255, (mask.astype(np.int64) + 1) % CLASSES).astype(np.uint8)
        return f.astype(np.float32), mask

    return [image(False) for _ in range(3)], [image(swap) for _ in range(2)]


@pytest.mark.parametrize("swap", [False, True])
def test_hbird_eval_matches_independent_computation(swap: bool) -> None:
    bank, queries = _problem(0, swap)
    names = [f"c{i}" for i in range(CLASSES)]
    result = hbird_eval(bank, queries, names, k=5, temperature=0.1)
    expected = _reference_miou(bank, queries, CLASSES, k=5, temperature=0.1)
    assert abs(result.iou.miou - expected) <= 1e-6
    assert result.bank_patches == 3 * GRID * GRID and result.num_queries == 2
    assert result.iou.miou > 0.5  # the features carry the classes; matching undoes the renaming
    if swap:
        assert not np.array_equal(result.iou.mapping, np.arange(CLASSES))


def test_bounded_memory_matches_independent_computation() -> None:
    bank, queries = _problem(1, swap=False)
    result = hbird_eval(bank, queries, [f"c{i}" for i in range(CLASSES)], k=3, temperature=0.05, memory_per_image=6)
    assert result.bank_patches == 3 * 6
    expected = _reference_miou(bank, queries, CLASSES, k=3, temperature=0.05, budget=6)
    assert abs(result.iou.miou - expected) <= 1e-6


def test_memory_labels_ignore_is_class_zero() -> None:
    mask = np.array([[255, 255, 1, 2], [255, 255, 1, 1]], dtype=np.uint8)
    labels = memory_labels(mask, 2, 3)
    np.testing.assert_allclose(labels, [[1.0, 0.0, 0.0], [0.0, 0.75, 0.25]])  # all-ignore patch kept as class 0
    with pytest.raises(ProtocolError, match="outside"):
        memory_labels(mask, 2, 2)


def test_memory_scores_and_selection() -> None:
    # Patches: {0}, {0, 1}, {1}, {2}, and one without labels. Class 0 is in 2 patches, 1 in 2, 2 in 1.
    labels = np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float32)
    u = np.random.default_rng(7).random(4)
    expected = np.array([2 * u[0], 4 * u[1], 2 * u[2], 1 * u[3], UNLABELLED_SCORE])
    np.testing.assert_allclose(memory_scores(labels, np.random.default_rng(7)), expected)
    chosen = select_memory(labels, 3, np.random.default_rng(7))
    np.testing.assert_array_equal(chosen, np.argsort(expected)[:3])
    assert 4 not in chosen
    np.testing.assert_array_equal(select_memory(labels, None, np.random.default_rng(0)), np.arange(5))


def test_absent_class_scores_zero_unlike_strict() -> None:
    # Class 2 never occurs nor is predicted: published mean counts it as 0, strict leaves it out.
    confusion = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    published = matched_miou(confusion, ["a", "b", "c"], "none")
    np.testing.assert_allclose(published.per_class, [3 / 4, 4 / 5, 0.0])
    assert published.miou == pytest.approx((3 / 4 + 4 / 5) / 3)
    assert iou_from_confusion(confusion).miou == pytest.approx((3 / 4 + 4 / 5) / 2)


def test_square_views_and_augmentation() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (30, 50)).astype(np.uint8)
    plain = SquareViews([(image, mask)], 28)[0]
    assert plain[0].shape == (28, 28, 3) and plain[1].shape == (28, 28)
    views = SquareViews([(image, mask)], 28, augment_pass=0, seed=3)
    a, b = views[0], SquareViews([(image, mask)], 28, augment_pass=0, seed=3)[0]
    np.testing.assert_array_equal(a[0], b[0])  # seeded
    assert set(np.unique(a[1])) <= {0, 1, 2}  # nearest: no blended labels
    for seed in range(50):  # scale 0.5-2 of the area: crops never exceed the image
        top, left, h, w = crop_box(30, 50, np.random.default_rng(seed))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50 and h * w >= 0.45 * 1500
