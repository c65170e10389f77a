"""Novelty detection on generated scenes: NECO vs the k-NN distance baseline, image and patch level.

Support set and in-distribution (ID) images are `neco.scenes` with 4 classes (background,
disc, box, triangle). Two out-of-distribution (OOD) test sets:

- `classes`: scenes drawn with all 6 classes, kept when at least `--min-ood-share` of their
  pixels belong to the two classes the support set never shows (ellipse, diamond: their own
  colours and stripe textures);
- `texture`: ID scenes with one disc (radius 20-30% of the side) repainted by a fine two-colour
  checkerboard (2-3 px cells), a texture absent from the support set, in ID-range colours.

The bank holds the support patches; thresholds are calibrated on separate held-out ID images
(95% of them accepted) and applied to the test sets.

- image level: ID test images vs OOD test images, image score = mean or a quantile of the
  patch novelties;
- patch level: every patch of the test images, OOD when at least half of its pixels are of an
  unseen class, ID when none is (patches in between are left out).

Metrics: AUROC (rank statistic, ties counted half) and FPR@95%TPR (share of ID samples scored
at least as novel as the 5% quantile of the OOD scores, i.e. the false alarms at the threshold
that catches 95% of OOD). The goal: the library's default method (`DEFAULT_METHOD`) measures
best at patch and image level on both OOD sets. `results.diagnosis` says why NECO does what it
does: per OOD set, medians of the quantities its ratio is made of, and the AUROC each would give. Features come from a RANDOM-INIT ViT-S/14-reg4 run in-process
(`neco.evaluation.backends.TorchBackend`) unless `--weights` names a checkpoint: the numbers say
how the scores behave on such features, not what a trained DINOv2 would give.
Results: benchmarks/results/novelty_<device>.json (see benchmarks/common.py for the schema).

    python benchmarks/novelty.py [--size 224] [--support 64] [--device cpu] [--weights SOURCE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import default_path, make_result, write_result  # benchmarks/ is the script's folder

from neco.client import MemoryBank, batch_features
from neco.client.novelty import (
    DEFAULT_KNN_K,
    DEFAULT_METHOD,
    NoveltyModel,
    NoveltySpec,
    aggregate,
    calibrate,
    knn_novelty,
)
from neco.contract import DEFAULT_K, ModelContract
from neco.scenes import SCENE_CLASSES, generate_scene

ID_CLASSES = 4
NOVEL_TEXTURE = 6
"""Mask label of repainted regions (any label >= ID_CLASSES counts as unseen)."""
ARCH = "vit_small_patch14_reg4_dinov2"
AGGREGATIONS: tuple[str | float, ...] = ("mean", 0.9, 1.0)
NECO_SPECS = (NoveltySpec(), NoveltySpec(variance=0.8), NoveltySpec(variance=0.95), NoveltySpec(dim=4))
KNN_KS = (1, DEFAULT_KNN_K, DEFAULT_K)
OOD_SETS = ("classes", "texture")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="scene side and encoder input (px)")
    parser.add_argument("--support", type=int, default=32, help="support images in the bank")
    parser.add_argument("--calibration", type=int, default=20, help="held-out ID images for the thresholds")
    parser.add_argument("--test", type=int, default=32, help="ID test images, and as many per OOD set")
    parser.add_argument("--min-ood-share", type=float, default=0.1, help="unseen-class pixel share of an OOD image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=None, help="load_backbone source; default: random init (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/novelty_<device>.json")
    return parser.parse_args(argv)


def make_backend(args: argparse.Namespace) -> Any:
    import torch

    from neco.evaluation.backends import TorchBackend
    from neco.model import create_backbone

    if args.weights is not None:
        return TorchBackend(args.weights, device=args.device)
    torch.manual_seed(args.seed)
    return TorchBackend(model=create_backbone(ARCH), contract=ModelContract.for_arch(ARCH), device=args.device)


def scenes(
    rng: np.random.Generator, count: int, size: int, ood_share: float | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """ID scenes (`ood_share` None) or 6-class scenes with at least that share of unseen pixels."""
    found = []
    while len(found) < count:
        image, mask = generate_scene(rng, (size, size), num_classes=ID_CLASSES if ood_share is None else 6)
        if ood_share is None or (mask >= ID_CLASSES).mean() >= ood_share:
            found.append((image, mask))
    return found


def texture_scenes(rng: np.random.Generator, count: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """ID scenes with one disc repainted by a fine checkerboard (mask label NOVEL_TEXTURE)."""
    yy, xx = np.mgrid[0:size, 0:size]
    found = []
    for image, mask in scenes(rng, count, size, None):
        radius = size * rng.uniform(0.2, 0.3)
        cy, cx = rng.uniform(radius, size - radius, 2)
        region = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        cell = int(rng.integers(2, 4))
        checker = ((yy // cell + xx // cell) % 2).astype(bool)
        texture = np.where(checker[..., None], rng.uniform(50, 205, 3), rng.uniform(50, 205, 3))
        image, mask = image.copy(), mask.copy()
        image[region] = texture[region].round().astype(np.uint8)
        mask[region] = NOVEL_TEXTURE
        found.append((image, mask))
    return found


def features_of(backend: Any, images: list[np.ndarray], batch: int = 16) -> np.ndarray:
    return np.concatenate([batch_features(backend, images[i : i + batch]) for i in range(0, len(images), batch)])


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Mann-Whitney AUROC from average ranks (OOD should score higher)."""
    values = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # ties share their average rank
    n_id, n_ood = len(id_scores), len(ood_scores)
    return float((ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2) / (n_id * n_ood))


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    threshold = np.quantile(ood_scores, 0.05, method="inverted_cdf")
    return float((id_scores >= threshold).mean())


def patch_truth(masks: list[np.ndarray], patch: int) -> np.ndarray:
    """Per patch of `patch` px: 1 = OOD (>= half unseen pixels), 0 = ID (none), -1 = mixed (left out)."""
    stack = np.stack(masks)
    b, h, w = stack.shape
    share = (stack >= ID_CLASSES).reshape(b, h // patch, patch, w // patch, patch).mean(axis=(2, 4))
    return np.where(share >= 0.5, 1, np.where(share == 0, 0, -1))


def evaluate(
    name: str, setting: dict[str, Any], maps: dict[str, np.ndarray], truth: dict[str, np.ndarray]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Image rows (per OOD set and aggregation, with the calibrated decision) and patch rows."""
    image_rows, patch_rows = [], []
    for aggregation in AGGREGATIONS:
        scores = {split: np.array([aggregate(m, aggregation) for m in maps[split]]) for split in maps}
        cal = calibrate(list(maps["calibration"]), "neco" if name == "neco" else "knn", aggregation, 0.95)
        for ood in OOD_SETS:
            image_rows.append(
                {
                    "method": name,
                    **setting,
                    "ood": ood,
                    "aggregation": aggregation,
                    "auroc": auroc(scores["id"], scores[ood]),
                    "fpr_at_95_tpr": fpr_at_95_tpr(scores["id"], scores[ood]),
                    "calibrated_threshold": cal.image_threshold,
                    "id_test_accepted": float((scores["id"] <= cal.image_threshold).mean()),
                    "ood_test_flagged": float((scores[ood] > cal.image_threshold).mean()),
                }
            )
    for ood in OOD_SETS:
        test = np.concatenate([maps["id"], maps[ood]]).reshape(-1)
        labels = np.concatenate([truth["id"], truth[ood]]).reshape(-1)
        patch_rows.append(
            {
                "method": name,
                **setting,
                "ood": ood,
                "auroc": auroc(test[labels == 0], test[labels == 1]),
                "fpr_at_95_tpr": fpr_at_95_tpr(test[labels == 0], test[labels == 1]),
                "id_patches": int((labels == 0).sum()),
                "ood_patches": int((labels == 1).sum()),
            }
        )
    return image_rows, patch_rows


def diagnose(
    model: NoveltyModel, bank_features: np.ndarray, feats: dict[str, np.ndarray], truth: dict[str, np.ndarray]
) -> dict[str, Any]:
    """What NECO's ratio is made of, for ID and OOD test patches of each set (medians), and each part's AUROC.

    NECO = ||P_d z|| / ||z|| with z = (h - mean) / std. `cos_to_id_mean` is the cosine of the raw
    unit feature h with the ID mean; `norm_z` alone and the residual ||z - P_d z|| alone are the
    distance-like scores the ratio divides away. `uncentred_ratio` is ||P h|| / ||h|| with P from
    the uncentred PCA of the raw bank features (d by the same explained-variance rule): the
    ratio without the centring step.
    """
    raw = bank_features.astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(raw.T @ raw)
    share = np.cumsum(eigenvalues[::-1]) / eigenvalues.sum()
    uncentred = eigenvectors[:, ::-1][:, : int(np.searchsorted(share, model.spec.variance)) + 1]
    mean_direction = model.mean / np.linalg.norm(model.mean)
    out: dict[str, Any] = {
        "neco_d": model.dim,
        "uncentred_d": int(uncentred.shape[1]),
        "standardised_mean_share_inside_subspace": float(
            np.linalg.norm(model.components @ (model.mean / model.scale)) / np.linalg.norm(model.mean / model.scale)
        ),
    }
    for ood in OOD_SETS:
        test = np.concatenate([feats["id"], feats[ood]]).reshape(-1, model.mean.shape[0]).astype(np.float64)
        labels = np.concatenate([truth["id"], truth[ood]]).reshape(-1)
        z = (test - model.mean) / model.scale
        norm_z, kept = np.linalg.norm(z, axis=1), np.linalg.norm(z @ model.components.T, axis=1)
        parts = {
            "cos_to_id_mean": test @ mean_direction,
            "norm_z": norm_z,
            "norm_projected": kept,
            "residual": np.sqrt(np.maximum(norm_z**2 - kept**2, 0.0)),
            "neco_ratio": kept / norm_z,
            "uncentred_ratio": np.linalg.norm(test @ uncentred, axis=1) / np.linalg.norm(test, axis=1),
        }
        distances = {"norm_z", "residual"}  # high = novel; the others are similarities, low = novel
        out[ood] = {
            name: {
                "id_median": float(np.median(values[labels == 0])),
                "ood_median": float(np.median(values[labels == 1])),
                "auroc_as_novelty": auroc(
                    *((1 if name in distances else -1) * values[labels == split] for split in (0, 1))
                ),
            }
            for name, values in parts.items()
        }
    return out


def describe(row: dict[str, Any]) -> str:
    return f"d {row['d']} ({row['spec']})" if row["method"] == "neco" else f"k {row['k']}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    support = scenes(rng, args.support, args.size, None)
    splits = {
        "calibration": scenes(rng, args.calibration, args.size, None),
        "id": scenes(rng, args.test, args.size, None),
        "classes": scenes(rng, args.test, args.size, args.min_ood_share),
        "texture": texture_scenes(rng, args.test, args.size),
    }
    backend = make_backend(args)
    bank = MemoryBank.build(backend, support, class_names=list(SCENE_CLASSES[:ID_CLASSES]), image_size=args.size)
    feats = {split: features_of(backend, [image for image, _ in pairs]) for split, pairs in splits.items()}
    truth = {
        split: patch_truth([mask for _, mask in pairs], backend.contract.patch_size) for split, pairs in splits.items()
    }
    extract_s = time.perf_counter() - start

    image_rows: list[dict[str, Any]] = []
    patch_rows: list[dict[str, Any]] = []
    diagnosis = diagnose(NoveltyModel.fit(bank.features), bank.features, feats, truth)
    for spec in NECO_SPECS:
        model = NoveltyModel.fit(bank.features, spec)
        maps = {split: model.novelty(f) for split, f in feats.items()}
        setting = {
            "spec": "default" if spec == NoveltySpec() else spec.model_dump(exclude_defaults=True),
            "d": model.dim,
        }
        rows, patches = evaluate("neco", setting, maps, truth)
        image_rows += rows
        patch_rows += patches
    sims = {}  # one search at the largest k; the k-th column gives every smaller k
    for split, f in feats.items():
        sims[split], _ = bank.search(f.reshape(-1, f.shape[-1]), max(KNN_KS))
    for k in KNN_KS:
        maps = {split: knn_novelty(sims[split][:, :k]).reshape(f.shape[:3]) for split, f in feats.items()}
        rows, patches = evaluate("knn", {"k": k}, maps, truth)
        image_rows += rows
        patch_rows += patches

    print(f"{'level':<6} {'ood':<8} {'method':<6} {'setting':<24} {'agg':<5} {'AUROC':>6} {'FPR95':>6}")
    for level, rows in (("image", image_rows), ("patch", patch_rows)):
        for row in rows:
            agg = str(row.get("aggregation", "-"))
            print(
                f"{level:<6} {row['ood']:<8} {row['method']:<6} {describe(row):<24} {agg:<5} "
                f"{row['auroc']:>6.3f} {row['fpr_at_95_tpr']:>6.3f}"
            )

    def pick(rows: list[dict[str, Any]], method: str, ood: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r for r in rows if r["method"] == method and r["ood"] == ood and all(r[k] == v for k, v in match.items())
        ]

    goal: dict[str, Any] = {
        "target": f"the default method ({DEFAULT_METHOD}) has the higher patch AUROC and the higher best-aggregation "
        f"image AUROC on both OOD sets (NECO: default spec; k-NN: k={DEFAULT_KNN_K})",
        "default_method": DEFAULT_METHOD,
    }
    met = True
    for ood in OOD_SETS:
        measured = {
            "neco": {
                "image_auroc_best_aggregation": max(r["auroc"] for r in pick(image_rows, "neco", ood, spec="default")),
                "patch_auroc": pick(patch_rows, "neco", ood, spec="default")[0]["auroc"],
            },
            "knn": {
                "image_auroc_best_aggregation": max(r["auroc"] for r in pick(image_rows, "knn", ood, k=DEFAULT_KNN_K)),
                "patch_auroc": pick(patch_rows, "knn", ood, k=DEFAULT_KNN_K)[0]["auroc"],
            },
        }
        other = "neco" if DEFAULT_METHOD == "knn" else "knn"
        goal[ood] = measured
        met = met and all(measured[DEFAULT_METHOD][key] > measured[other][key] for key in measured[other])
        print(
            f"{ood}: "
            + ", ".join(
                f"{m} patch {v['patch_auroc']:.3f} image {v['image_auroc_best_aggregation']:.3f}"
                for m, v in measured.items()
            )
        )
    goal["met"] = met
    settings = {
        **{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "encoder": args.weights or f"{ARCH}, random init (torch seed {args.seed})",
        "bank_patches": len(bank),
        "patch_grid": list(feats["id"].shape[1:3]),
        "id_classes": list(SCENE_CLASSES[:ID_CLASSES]),
        "unseen_classes": list(SCENE_CLASSES[ID_CLASSES:]),
        "calibration_acceptance": 0.95,
        "feature_extraction_s": round(extract_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
    }
    out = args.out or default_path("novelty", "cuda" if str(args.device).startswith("cuda") else "cpu")
    results = {"image": image_rows, "patch": patch_rows, "diagnosis": diagnosis}
    write_result(make_result("novelty", settings, results, goal), out)


if __name__ == "__main__":
    main()
