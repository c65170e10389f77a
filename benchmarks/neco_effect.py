"""Does NeCo post-pretraining improve in-context segmentation? Measured, not assumed.

On generated scenes, Hummingbird mIoU (k-NN label transfer, the same code path as
`neco segment`) of the starting weights and of NeCo-post-pretrained weights after several
step counts, for three variants of the objective:

- cosine:      the recipe (EMA teacher, cosine similarity)
- no_teacher:  teacher momentum 0, i.e. the teacher is a copy of the current student (no EMA)
- euclidean:   the recipe with euclidean instead of cosine patch similarity

Each variant is ONE training run of max(--steps) steps; the smaller step counts are its
intermediate checkpoints (so they share the longest run's learning-rate schedule). Features
come from the in-process torch backend (bf16 on CUDA). Results go to a table on stdout and to
benchmarks/results/neco_effect_<device>.json (`benchmarks/common.py` schema), whatever they show:
`settings` holds the metric, the starting weights and every argument, `results` maps "rows"
(one per variant and step count) and "total_seconds"; `goal` is null.

CPU default (~10 min on 2 free cores): random-init ViT-S/14-reg, 24 training scenes, steps
0/4/12, 70/28 px crops. Longer GPU run, e.g.:
    python benchmarks/neco_effect.py --device cuda --steps 0 100 300 1000 --train-images 512 \
        --size 224 --input-size 224 --weights vit_small_patch14_reg4_dinov2 \
        --set optim.batch_size=32 crops.global_size=224 crops.local_size=98 crops.num_local=4
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from functools import reduce
from pathlib import Path

from common import default_path, machine_info, make_result, write_result

from neco.contract import DEFAULT_K, DEFAULT_TEMPERATURE
from neco.layout import IMAGES_DIR

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "cosine": [],
    "no_teacher": ["method.teacher_momentum=0.0", "method.teacher_momentum_end=0.0"],
    "euclidean": ["method.similarity=euclidean"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 4, 12], help="step counts to evaluate (0 = start)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--weights", default=None, help="starting weights (load_backbone source); default random init")
    parser.add_argument("--arch", default="vit_small_patch14_reg4_dinov2")
    parser.add_argument("--train-config", type=Path, default=REPO / "configs" / "train_smoke.yaml")
    parser.add_argument(
        "--backbone-lr",
        type=float,
        default=1e-4,
        help="the recipe's 1e-5 is for pretrained DINOv2; random init needs more to move",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=["crops.global_size=70", "crops.local_size=28"],
        metavar="KEY=VALUE",
        help="extra training overrides (default: small crops so the CPU run stays short)",
    )
    parser.add_argument("--train-images", type=int, default=24, help="scenes for NeCo training and the bank")
    parser.add_argument("--val-images", type=int, default=12)
    parser.add_argument("--size", type=int, default=112, help="scene side (px)")
    parser.add_argument("--input-size", type=int, default=112, help="square encoder input for Hummingbird")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/neco_effect_<device>.json")
    return parser.parse_args(argv)


def starting_weights(args: argparse.Namespace, out: Path) -> Path | str:
    """The given source, or a seeded random-init backbone saved as an artefact."""
    if args.weights is not None:
        return args.weights
    import torch

    from neco.contract import ModelContract
    from neco.model import create_backbone, save_artefact

    torch.manual_seed(args.seed)
    return save_artefact(create_backbone(args.arch), ModelContract.for_arch(args.arch), out, {"seed": args.seed})


def train_variant(
    args: argparse.Namespace, variant: str, start: Path | str, images: Path, device: str, work: Path
) -> tuple[Path, float]:
    """One run of max(steps) steps keeping a checkpoint at every requested step count."""
    from neco.training.config import load_train_config
    from neco.training.run import CHECKPOINT_DIR, train

    positive = sorted({s for s in args.steps if s > 0})
    every = reduce(math.gcd, positive)
    overrides = [
        f"output_dir={work / variant}",
        f"seed={args.seed}",
        f"model.arch={args.arch}",
        f"model.weights={start}",
        "data.kind=folder",
        f"data.root={images}",
        f"runtime.device={device}",
        f"runtime.precision={'bf16' if device == 'cuda' else 'fp32'}",
        "runtime.tensorboard=false",
        f"runtime.checkpoint_every={every}",
        f"runtime.keep_checkpoints={len(range(every, max(positive) + 1, every))}",
        f"optim.steps={max(positive)}",
        f"optim.backbone_lr={args.backbone_lr}",
        *VARIANTS[variant],
        *args.set,
    ]
    started = time.perf_counter()
    train(load_train_config(args.train_config, overrides))
    return work / variant / CHECKPOINT_DIR, time.perf_counter() - started


def evaluate(source: Path | str, arch: str, device: str, train, val, size: int, seed: int) -> dict[str, object]:
    from neco.evaluation.backends import TorchBackend
    from neco.evaluation.hummingbird import build_bank, evaluate_bank

    backend = TorchBackend(source, arch=arch, device=device)
    bank = build_bank(backend, train, train.class_names, (size, size), seed=seed, progress=False)
    return evaluate_bank(backend, bank, val, progress=False).to_dict()


def write_report(
    args: argparse.Namespace,
    device: str,
    machine: dict[str, object],
    rows: list[dict[str, object]],
    seconds: float,
    out: Path,
) -> None:
    """Rewritten after every variant, so a long run that is cut short keeps what it measured."""
    settings = {
        "metric": f"Hummingbird mIoU on generated scenes (k={DEFAULT_K}, temperature={DEFAULT_TEMPERATURE})",
        "device": device,
        "starting_weights": args.weights or f"random init (seed {args.seed})",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    results = {"rows": rows, "total_seconds": round(seconds, 1)}
    write_result(make_result("neco_effect", settings, results, goal=None, machine=machine), out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from neco.evaluation.backends import resolve_device
    from neco.evaluation.datasets import load_dataset
    from neco.scenes import write_scene_dataset
    from neco.training.checkpoint import checkpoint_path

    device = resolve_device(args.device)
    device = "cuda" if device.startswith("cuda") else device
    out = args.out or default_path("neco_effect", device)
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="neco-effect-"))
    started = time.perf_counter()
    rows: list[dict[str, object]] = []
    try:
        root = write_scene_dataset(
            work / "scenes",
            {"train": args.train_images, "val": args.val_images},
            size=(args.size, args.size),
            seed=args.seed,
        )
        train_set, val_set = load_dataset("folder", root, "train"), load_dataset("folder", root, "val")
        start = starting_weights(args, work / "start")
        baseline = evaluate(start, args.arch, device, train_set, val_set, args.input_size, args.seed)
        print(f"start: mIoU {100 * baseline['miou']:.1f}", flush=True)
        for variant in args.variants:
            rows.append({"variant": variant, "steps": 0, **baseline})
            if not any(s > 0 for s in args.steps):
                continue
            checkpoints, seconds = train_variant(args, variant, start, root / "train" / IMAGES_DIR, device, work)
            for steps in sorted({s for s in args.steps if s > 0}):
                result = evaluate(
                    checkpoint_path(checkpoints, steps),
                    args.arch,
                    device,
                    train_set,
                    val_set,
                    args.input_size,
                    args.seed,
                )
                rows.append({"variant": variant, "steps": steps, "train_seconds_full_run": round(seconds, 1), **result})
                print(f"{variant} @ {steps} steps: mIoU {100 * result['miou']:.1f}", flush=True)
            write_report(args, device, machine, rows, time.perf_counter() - started, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'variant':<12} " + " ".join(f"{s:>7}" for s in sorted(set(args.steps))))
    for variant in args.variants:
        cells = {r["steps"]: r["miou"] for r in rows if r["variant"] == variant}
        print(f"{variant:<12} " + " ".join(f"{100 * cells[s]:7.1f}" for s in sorted(set(args.steps))))
    write_report(args, device, machine, rows, time.perf_counter() - started, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
