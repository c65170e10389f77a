"""Does NeCo post-pretraining improve dense features? Measured, not assumed, over seeds.

On generated scenes (by default the "textures" family of `neco.scenes`, where colour says
nothing about the class), for every seed: the starting weights and NeCo-post-pretrained weights
after several step counts are scored with

- Hummingbird in-context mIoU on held-out scenes (k-NN label transfer, `neco segment`'s path);
- ordering agreement (`neco.evaluation.ordering`): mean Spearman correlation, between two
  colour-jittered overlapping views of each held-out image, of aligned patches' similarity
  ranks to a fixed reference set: the quantity NeCo optimises.

Each (variant, seed) is ONE training run of max(--steps) steps; smaller step counts are its
intermediate checkpoints (they share the longest run's schedule). Training cost is reported in
CPU seconds of this process (`time.process_time`, all threads; loader workers are off), which
stays meaningful on a shared machine where wall time is not. For the first --compare-seeds seeds
the start is scored on the other scene family too, so the two families' difficulty can be compared.

Variants: cosine (the recipe), no_teacher (teacher momentum 0), euclidean (euclidean patch
similarity). Results: a table on stdout and benchmarks/results/neco_effect_<device>.json
(`benchmarks/common.py` schema; `results.summary` = mean over seeds per variant and step count,
`goal` = >= +5 mIoU mean gain within 5 CPU-minutes of training).

CPU default = the demo's recipe (configs/train_demo_cpu.yaml), seeds 0 1 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from functools import reduce
from pathlib import Path

import numpy as np
from common import default_path, machine_info, make_result, write_result

from neco.contract import DEFAULT_K, DEFAULT_TEMPERATURE
from neco.layout import IMAGES_DIR

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "cosine": [],
    "no_teacher": ["method.teacher_momentum=0.0", "method.teacher_momentum_end=0.0"],
    "euclidean": ["method.similarity=euclidean"],
}
GOAL_GAIN, GOAL_CPU_MINUTES = 0.05, 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100, 200], help="step counts (0 = start)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["cosine"], choices=list(VARIANTS))
    parser.add_argument("--family", default="textures", choices=["textures", "shapes"])
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    parser.add_argument("--weights", default=None, help="starting weights (load_backbone source); default random init")
    parser.add_argument("--arch", default="vit_small_patch14_reg4_dinov2")
    parser.add_argument("--train-config", type=Path, default=REPO / "configs" / "train_demo_cpu.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra training overrides")
    parser.add_argument("--train-images", type=int, default=24, help="scenes for NeCo training and the bank")
    parser.add_argument("--val-images", type=int, default=12)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=112, help="scene side (px)")
    parser.add_argument("--input-size", type=int, default=112, help="square encoder input for the metrics")
    parser.add_argument(
        "--compare-seeds", type=int, default=1, help="first N seeds also score the start on the other family"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        nargs="*",
        default=None,
        metavar="JSON",
        help="keep the seeds already measured in these results (default --out; same settings), run the others",
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/neco_effect_<device>.json")
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.steps) or not args.seeds:
        parser.error("--steps must be >= 0 and --seeds non-empty")
    return args


RESUME_KEYS = (
    "family", "device", "weights", "arch", "train_config", "set", "variants",
    "train_images", "val_images", "num_classes", "size", "input_size",
)  # fmt: skip
"""Arguments that must match for rows of an earlier run to be kept (--steps may differ)."""


def plain_args(args: argparse.Namespace) -> dict[str, object]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def earlier_rows(args: argparse.Namespace, out: Path) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """--resume: (rows, argument sets) of earlier runs, refused if their settings differ.

    A seed measured in several files is kept from the first one only.
    """
    if args.resume is None:
        return [], []
    rows: list[dict[str, object]] = []
    earlier: list[dict[str, object]] = []
    for path in args.resume or [out]:
        if not path.is_file():
            if args.resume:
                raise SystemExit(f"--resume: {path} does not exist")
            continue
        document = json.loads(path.read_text())
        before, now = document["settings"]["args"], plain_args(args)
        differs = [k for k in RESUME_KEYS if before.get(k) != now[k]]
        if differs:
            raise SystemExit(f"--resume: {path} was measured with other {', '.join(differs)}")
        seen = {r["seed"] for r in rows}
        rows += [r for r in document["results"]["rows"] if r["seed"] not in seen]
        earlier += [*document["settings"].get("earlier_args", []), before]
    return rows, earlier


def starting_weights(args: argparse.Namespace, seed: int, out: Path) -> Path | str:
    """The given source, or a seeded random-init backbone saved as an artefact."""
    if args.weights is not None:
        return args.weights
    import torch

    from neco.contract import ModelContract
    from neco.model import create_backbone, save_artefact

    torch.manual_seed(seed)
    return save_artefact(create_backbone(args.arch), ModelContract.for_arch(args.arch), out, {"seed": seed})


def train_variant(
    args: argparse.Namespace, variant: str, seed: int, start: Path | str, images: Path, device: str, work: Path
) -> tuple[Path, float, float]:
    """One run of max(steps) steps keeping a checkpoint at every requested step count.

    Returns (checkpoint dir, CPU seconds, wall seconds).
    """
    from neco.training.config import load_train_config
    from neco.training.run import CHECKPOINT_DIR, train

    positive = sorted({s for s in args.steps if s > 0})
    every = reduce(math.gcd, positive)
    out = work / f"{variant}_seed{seed}"
    overrides = [
        f"output_dir={out}",
        f"seed={seed}",
        f"model.arch={args.arch}",
        f"model.weights={start}",
        "data.kind=folder",
        f"data.root={images}",
        "data.num_workers=0",
        f"runtime.device={device}",
        f"runtime.precision={'bf16' if device == 'cuda' else 'fp32'}",
        "runtime.tensorboard=false",
        "runtime.progress=false",
        f"runtime.checkpoint_every={every}",
        f"runtime.keep_checkpoints={len(range(every, max(positive) + 1, every))}",
        f"optim.steps={max(positive)}",
        *VARIANTS[variant],
        *args.set,
    ]
    cfg = load_train_config(args.train_config, overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    train(cfg)
    return out / CHECKPOINT_DIR, time.process_time() - cpu, time.perf_counter() - wall


def evaluate(source: Path | str, args: argparse.Namespace, device: str, train, val, seed: int) -> dict[str, object]:
    """Hummingbird mIoU and ordering agreement of one set of weights."""
    from neco.evaluation.backends import TorchBackend
    from neco.evaluation.hummingbird import build_bank, evaluate_bank
    from neco.evaluation.ordering import ordering_agreement

    size = (args.input_size, args.input_size)
    backend = TorchBackend(source, arch=args.arch, device=device)
    bank = build_bank(backend, train, train.class_names, size, seed=seed, progress=False)
    result = evaluate_bank(backend, bank, val, progress=False).to_dict()
    images = [val[i][0] for i in range(len(val))]
    references = [train[i][0] for i in range(min(4, len(train)))]
    ordering = ordering_agreement(backend, images, references, size=args.input_size, seed=seed)
    return {**result, "ordering": ordering.to_dict()}


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Mean (and spread) over seeds per (variant, steps): mIoU, gain over the start, ordering, CPU minutes."""
    start = {r["seed"]: r for r in rows if r["steps"] == 0 and r["variant"] == "start"}
    groups: dict[tuple[str, int], list[dict[str, object]]] = {}
    for r in rows:
        if not str(r["variant"]).startswith("start"):
            groups.setdefault((str(r["variant"]), int(r["steps"])), []).append(r)  # type: ignore[arg-type]
    summary = []
    for (variant, steps), group in sorted(groups.items()):
        gains = [float(r["miou"]) - float(start[r["seed"]]["miou"]) for r in group]  # type: ignore[arg-type]
        summary.append(
            {
                "variant": variant,
                "steps": steps,
                "seeds": [r["seed"] for r in group],
                "miou_mean": float(np.mean([r["miou"] for r in group])),
                "start_miou_mean": float(np.mean([start[r["seed"]]["miou"] for r in group])),  # type: ignore[index]
                "gain_mean": float(np.mean(gains)),
                "gain_min": float(np.min(gains)),
                "ordering_mean": float(np.mean([r["ordering"]["mean_spearman"] for r in group])),  # type: ignore[index]
                "start_ordering_mean": float(
                    np.mean([start[r["seed"]]["ordering"]["mean_spearman"] for r in group])  # type: ignore[index]
                ),
                "train_cpu_minutes_mean": float(np.mean([r["train_cpu_seconds"] for r in group])) / 60,
            }
        )
    return summary


def goal_of(summary: list[dict[str, object]], seeds: int) -> dict[str, object]:
    met = [
        s
        for s in summary
        if len(s["seeds"]) >= 3  # type: ignore[arg-type]
        and float(s["gain_mean"]) >= GOAL_GAIN  # type: ignore[arg-type]
        and float(s["train_cpu_minutes_mean"]) <= GOAL_CPU_MINUTES  # type: ignore[arg-type]
    ]
    return {
        "target": f">= +{100 * GOAL_GAIN:.0f} mIoU mean over >= 3 seeds in <= {GOAL_CPU_MINUTES:.0f} CPU-minutes",
        "seeds_run": seeds,
        "met": bool(met),
        "met_by": [{"variant": s["variant"], "steps": s["steps"]} for s in met],
    }


def write_report(
    args, device: str, machine: dict, rows: list, seconds: float, out: Path, earlier: list
) -> list[dict[str, object]]:
    """Rewritten after every run, so a long run that is cut short keeps what it measured."""
    summary = summarise(rows)
    settings = {
        "metric": f"Hummingbird mIoU (k={DEFAULT_K}, temperature={DEFAULT_TEMPERATURE}) on held-out "
        f"'{args.family}' scenes; ordering = mean Spearman of aligned patches' reference ranks across two views",
        "cost": "train_cpu_seconds = time.process_time() of the training call (all threads, no loader workers)",
        "device": device,
        "starting_weights": args.weights or "random init (seed = run seed)",
        "args": plain_args(args),
        "earlier_args": earlier,  # --resume: the argument sets of the runs whose rows were kept
    }
    starts: dict[str, list[float]] = {}
    for r in rows:
        if str(r["variant"]).startswith("start"):
            starts.setdefault(str(r["family"]), []).append(float(r["miou"]))  # type: ignore[arg-type]
    start_by_family = {family: {"miou_mean": float(np.mean(v)), "seeds": len(v)} for family, v in starts.items()}
    results = {
        "summary": summary,
        "start_by_family": start_by_family,
        "rows": rows,
        "total_wall_seconds": round(seconds, 1),
    }
    goal = goal_of(summary, len({r["seed"] for r in rows}))
    write_result(make_result("neco_effect", settings, results, goal=goal, machine=machine), out)
    return summary


def run_seed(args, seed: int, device: str, work: Path, rows: list[dict[str, object]]) -> None:
    from neco.evaluation.datasets import load_dataset
    from neco.scenes import write_scene_dataset
    from neco.training.checkpoint import checkpoint_path

    splits = {"train": args.train_images, "val": args.val_images}
    other = "shapes" if args.family == "textures" else "textures"
    compare = seed in args.seeds[: args.compare_seeds]
    datasets = {}
    for family in (args.family, other) if compare else (args.family,):
        root = write_scene_dataset(
            work / f"scenes_{family}_{seed}", splits, (args.size, args.size), args.num_classes, seed, family
        )
        datasets[family] = (root, load_dataset("folder", root, "train"), load_dataset("folder", root, "val"))
    root, train_set, val_set = datasets[args.family]
    start = starting_weights(args, seed, work / f"start_{seed}")
    for family, variant in ((args.family, "start"), (other, f"start_{other}"))[: 2 if compare else 1]:
        result = evaluate(start, args, device, *datasets[family][1:], seed)
        rows.append({"variant": variant, "seed": seed, "steps": 0, "family": family, **result})
        order = result["ordering"]["mean_spearman"]  # type: ignore[index]
        print(f"seed {seed} {variant} ({family}): mIoU {100 * result['miou']:.1f} ordering {order:.3f}", flush=True)
    positive = sorted({s for s in args.steps if s > 0})
    for variant in args.variants if positive else []:
        checkpoints, cpu, wall = train_variant(args, variant, seed, start, root / "train" / IMAGES_DIR, device, work)
        for steps in positive:
            result = evaluate(checkpoint_path(checkpoints, steps), args, device, train_set, val_set, seed)
            share = steps / positive[-1]  # one run: the cost of an intermediate checkpoint is pro rata
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "steps": steps,
                    "family": args.family,
                    "train_cpu_seconds": round(cpu * share, 1),
                    "train_wall_seconds": round(wall * share, 1),
                    **result,
                }
            )
            order = result["ordering"]["mean_spearman"]  # type: ignore[index]
            print(f"seed {seed} {variant} @ {steps}: mIoU {100 * result['miou']:.1f} ordering {order:.3f}", flush=True)
        shutil.rmtree(checkpoints.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from neco.model import resolve_device

    device = resolve_device(args.device).type
    out = args.out or default_path("neco_effect", device)
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="neco-effect-"))
    started = time.perf_counter()
    rows, earlier = earlier_rows(args, out)
    done = {r["seed"] for r in rows}
    try:
        for seed in args.seeds:
            if seed in done:
                print(f"seed {seed}: kept from {out}", flush=True)
                continue
            run_seed(args, seed, device, work, rows)
            write_report(args, device, machine, rows, time.perf_counter() - started, out, earlier)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = write_report(args, device, machine, rows, time.perf_counter() - started, out, earlier)
    print(f"\n{'variant':<12} {'steps':>6} {'CPU-min':>8} {'mIoU':>6} {'gain':>6} {'ordering':>14}")
    for s in summary:
        print(
            f"{s['variant']:<12} {s['steps']:>6} {s['train_cpu_minutes_mean']:8.2f} {100 * s['miou_mean']:6.1f} "
            f"{100 * s['gain_mean']:+6.1f} {s['start_ordering_mean']:6.3f}->{s['ordering_mean']:.3f}"
        )
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
