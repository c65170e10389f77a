"""One-command GPU check: the recipe's train step, loader, sorter and inference, in one JSON.

    python benchmarks/gpu_check.py                 # one CUDA GPU, no network, <= 8 minutes
    benchmarks/gpu_check.sh                        # the same, from the repository root
    python benchmarks/gpu_check.py --device cpu --tiny    # the CPU dry run the tests use
    python benchmarks/gpu_check.py --arch vit_small_patch14_reg4_dinov2 vit_small_patch16_dinov3
                                                   # several backbones side by side in one run

On generated data (no dataset, no download: random-init weights of the recipe's architecture),
it measures, side by side in one process:

1. the train step of configs/train_vits14_reg_coco224.yaml in bf16, eager and `torch.compile`d:
   images/s, the step split (data / forward / sorter / backward / ...), peak memory, model-FLOP
   utilisation (FLOPs counted on one eager step by `torch.utils.flop_counter`);
2. the loader's images/s with the configured workers;
3. the differentiable sorter, forward + backward, vs diffsort at 31,360 and 62,720 rows;
4. encoder inference, eager fp32 vs bf16 (and onnxruntime CUDA FP16 where installed);
5. the 25-epoch COCO train2017 recipe extrapolated to GPU-hours from the best step rate,
   printed beside the paper's 19 GPU-hours.

`--arch A[=CONFIG] B[=CONFIG] ...` repeats the train step (1), inference (4) and extrapolation
(5) for each backbone, under `results.by_arch`; the top-level figures are the first one's. A
backbone without `=CONFIG` uses its family's recipe (`FAMILY_RECIPES`, falling back to
`--config`); a backbone whose training config does not validate (a DINOv2 recipe's 98-px crops
for patch 16) gets the error in its train-step entry and still its inference figures.

Writes benchmarks/results/gpu_check_<device>.json (`benchmarks/common.py` schema; `settings`
holds the device name and sizes, `results` one section per item, `goal` = finishes in 8 minutes).
Reuses train_step.py (loader, peak FLOP/s), sorter.py (the same sorter steps) and inference.py
(the same eager runners).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import default_path, machine_info, make_result, write_result

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "train_vits14_reg_coco224.yaml"
COCO_TRAIN_IMAGES = 118_287
RECIPE_EPOCHS = 25
PAPER_GPU_HOURS = 19.0
TIME_LIMIT_S = 8 * 60
FAMILY_RECIPES = {
    "dinov2": RECIPE,
    "dinov3": REPO / "configs" / "train_vits16_dinov3_coco224.yaml",
}
"""The training recipe each backbone family is measured with unless `--arch A=CONFIG` names one."""
TINY_GLOBAL_PATCHES, TINY_LOCAL_PATCHES = 4, 2
"""Tiny crops in patches (56/28 px at patch 14, 64/32 px at patch 16): sizes must fit the backbone's patch."""
TINY_SET = [
    "optim.batch_size=2",
    "crops.num_local=1",
    "method.grid_size=2",
    "method.num_references=4",
    "method.queue_length=8",
    "method.queue_push_per_image=2",
    "model.head_hidden_dim=64",
    "model.head_out_dim=32",
    "data.num_workers=0",
    "data.scenes_count=8",
    "data.scenes_size=64",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--config", type=Path, default=RECIPE)
    parser.add_argument(
        "--arch",
        nargs="+",
        default=None,
        metavar="ARCH[=CONFIG]",
        help="backbones to measure side by side (default: the --config's arch only)",
    )
    parser.add_argument("--compile", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, queue fill)")
    parser.add_argument("--loader-batches", type=int, default=10)
    parser.add_argument("--sorter-rows", type=int, nargs="+", default=[31_360, 62_720])
    parser.add_argument("--sorter-repeats", type=int, default=5)
    parser.add_argument("--inference-size", type=int, default=224)
    parser.add_argument("--inference-batch", type=int, default=32)
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime CUDA FP16 export and timing")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU dry run (tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU dry runs)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra train-config overrides")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/gpu_check_<device>.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.loader_batches < 1 or min(args.sorter_rows) < 2:
        parser.error("--steps and --loader-batches must be >= 1, --warmup >= 0, --sorter-rows >= 2")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    try:
        args.archs = arch_configs(args.arch, args.config)
    except ValueError as exc:
        parser.error(str(exc))
    if args.tiny:
        args.sorter_rows, args.inference_size, args.inference_batch = [64], 56, 2
        args.no_onnx = True
    return args


def arch_configs(entries: list[str] | None, config: Path) -> list[tuple[str | None, Path]]:
    """`ARCH[=CONFIG]` entries -> (arch, training config); None: the config's own arch only."""
    from neco.contract import supported_arch_spec

    if not entries:
        return [(None, config)]
    out = []
    for entry in entries:
        arch, _, path = entry.partition("=")
        family = supported_arch_spec(arch).family
        recipe = FAMILY_RECIPES[family] if config == RECIPE else config
        chosen = Path(path) if path else (recipe if recipe.is_file() else config)
        out.append((arch, chosen))
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_config(args: argparse.Namespace, compiled: bool, arch: str | None = None, config: Path | None = None):
    from neco.training.config import load_train_config

    precision = "bf16" if args.device == "cuda" else "fp32"
    overrides = [
        f"runtime.device={args.device}",
        f"runtime.precision={precision}",
        f"runtime.compile={str(compiled).lower()}",
        "runtime.tensorboard=false",
        "runtime.progress=false",
        "model.weights=null",  # random init of the recipe's architecture: no network, same cost
        "data.kind=scenes",
        *([f"model.arch={arch}"] if arch else []),
    ]
    if args.tiny:
        from neco.contract import supported_arch_spec

        patch = supported_arch_spec(load_train_config(config or args.config, overrides).model.arch).patch_size
        overrides += [
            *TINY_SET,
            f"crops.global_size={TINY_GLOBAL_PATCHES * patch}",
            f"crops.local_size={TINY_LOCAL_PATCHES * patch}",
        ]
    return load_train_config(config or args.config, [*overrides, *args.set])


def train_step_figures(
    args: argparse.Namespace, compiled: bool, device: torch.device, arch: str | None = None, config: Path | None = None
) -> dict[str, object]:
    """images/s, per-phase seconds, peak memory and MFU of the real `Trainer.train_step`."""
    from train_step import measure_steps, peak_flops

    from neco.training.run import build_dataset

    cfg = train_config(args, compiled, arch, config)
    torch.manual_seed(cfg.seed)
    measured = measure_steps(cfg, build_dataset(cfg), device, args.steps, args.warmup)
    elapsed, flops = float(measured["elapsed_s"]), float(measured["flops_per_step"])
    step_s = elapsed / args.steps
    peak = peak_flops(device, None)
    return {
        "compile": compiled,
        "batch_size": cfg.optim.batch_size,
        "images_per_s": args.steps * cfg.optim.batch_size * cfg.optim.accumulation / elapsed,
        "step_s": step_s,
        "warmup_s": measured["warmup_s"],
        "phase_s_per_step": {name: secs / args.steps for name, secs in measured["phase_s"].items()},
        "model_flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None,
        "peak_memory_mib": measured["peak_memory_mib"],
    }


def loader_figures(args: argparse.Namespace) -> dict[str, object]:
    from train_step import loader_throughput

    from neco.training.run import build_dataset

    cfg = train_config(args, compiled=False)
    return {
        "workers": cfg.data.num_workers,
        "images_per_s": loader_throughput(build_dataset(cfg), cfg, args.loader_batches),
    }


def sorter_figures(args: argparse.Namespace, device: torch.device) -> list[dict[str, object]]:
    """Ours vs diffsort (when importable), forward + backward, the sorter benchmark's own steps."""
    import importlib.util

    from sorter import _measure, _peak_memory, _steps

    reference = importlib.util.find_spec("diffsort") is not None
    rows_out = []
    for rows in args.sorter_rows:
        entry: dict[str, object] = {"rows": rows}
        for name, step in _steps(rows, device, reference).items():
            measured = _measure(step, device, args.sorter_repeats)
            entry[name] = {"median_s": measured["median_s"], "peak_bytes": _peak_memory(step, device)}
        if reference:
            entry["speedup"] = entry["diffsort"]["median_s"] / entry["ours"]["median_s"]  # type: ignore[index]
        rows_out.append(entry)
    return rows_out


def inference_figures(args: argparse.Namespace, device: torch.device, work: Path, arch: str) -> dict[str, object]:
    """Encoder images/s of `arch`: eager fp32 vs bf16, and ORT CUDA FP16 where the provider is installed.

    The input side is `--inference-size` rounded down to the backbone's patch multiple."""
    from inference import images_per_second, torch_runner

    from neco.contract import ModelContract
    from neco.export.parity import generated_images
    from neco.model import DenseFeatureModel
    from neco.model.testing import random_backbone

    contract = ModelContract.for_arch(arch)
    model = DenseFeatureModel(random_backbone(arch, seed=0), contract).eval()
    size = contract.floor_to_patch(args.inference_size)
    images = generated_images(args.inference_batch, (size, size), seed=0)
    seconds, iters = (3.0, 5) if not args.tiny else (0.0, 1)
    runners = {"eager_fp32": torch_runner(model.to(device), device.type, None)}
    runners["eager_bf16"] = torch_runner(model, device.type, torch.bfloat16)
    out: dict[str, object] = {"arch": arch, "size": size, "batch": args.inference_batch}
    onnx_note = "skipped (--no-onnx)" if args.no_onnx else None
    if not args.no_onnx:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            from neco.export.config import OnnxSettings
            from neco.export.onnx_export import export_onnx
            from neco.export.parity import ort_features, ort_session
            from neco.export.precision import convert_fp16

            fp32 = export_onnx(model.cpu().float(), work / "fp32.onnx", OnnxSettings(simplify=False))
            model.to(device)
            session = ort_session(convert_fp16(fp32, work / "fp16.onnx"), ["CUDAExecutionProvider"])
            runners["ort_cuda_fp16"] = ort_features(session)
        else:
            onnx_note = f"onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})"
    out["images_per_s"] = {name: images_per_second(run, images, seconds, iters) for name, run in runners.items()}
    out["ort_cuda_fp16_note"] = onnx_note
    return out


def extrapolate(step_images_per_s: float, loader_images_per_s: float) -> dict[str, float]:
    """GPU-hours of 25 epochs over COCO train2017 (1 image = 1 sample) at the slower of the best
    train-step rate and the loader's rate: whichever is slower bounds a real run."""
    rate = min(step_images_per_s, loader_images_per_s)
    hours = RECIPE_EPOCHS * COCO_TRAIN_IMAGES / rate / 3600
    return {
        "step_images_per_s": step_images_per_s,
        "loader_images_per_s": loader_images_per_s,
        "images_per_s": rate,
        "recipe_gpu_hours": hours,
        "paper_gpu_hours": PAPER_GPU_HOURS,
    }


def arch_figures(
    args: argparse.Namespace, device: torch.device, work: Path, arch: str | None, config: Path, loader_rate: float
) -> dict[str, object]:
    """Train step per compile variant, inference and the extrapolation of one backbone.

    A training config that refuses the backbone (or a step that fails) is reported in place of
    the train-step figures, so one run still measures the other backbones and this one's inference.
    """
    figures: dict[str, object] = {"config": _relative(config)}
    steps: dict[str, object] = {}
    try:
        arch = arch or train_config(args, False, None, config).model.arch
        for variant in args.compile:
            steps[variant] = step = train_step_figures(args, variant == "compiled", device, arch, config)
            print(f"{arch} train step {variant}: {step['images_per_s']:.1f} img/s, MFU {step['mfu']}", flush=True)
    except (ValueError, RuntimeError, AssertionError) as exc:  # config validation; a step timm refuses
        steps["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{arch} train step not measured: {steps['error']}", flush=True)
    if arch is None:
        raise SystemExit(f"gpu_check: {config} does not name a usable architecture: {steps['error']}")
    figures["arch"], figures["train_step"] = arch, steps
    figures["inference"] = inference_figures(args, device, work, arch)
    rates = [float(s["images_per_s"]) for s in steps.values() if isinstance(s, dict)]
    figures["extrapolation"] = extrapolate(max(rates), loader_rate) if rates else None
    return figures


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False (use --device cpu --tiny)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info()
    results: dict[str, object] = {"loader": loader_figures(args)}
    results["sorter"] = sorter_figures(args, device)
    loader_rate = float(results["loader"]["images_per_s"])  # type: ignore[index]
    by_arch: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, config in args.archs:
            figures = arch_figures(args, device, Path(tmp), arch, config, loader_rate)
            by_arch[str(figures["arch"])] = figures
    first = next(iter(by_arch.values()))
    results.update(train_step=first["train_step"], inference=first["inference"], extrapolation=first["extrapolation"])
    results["by_arch"] = by_arch
    estimate = first["extrapolation"]
    seconds = time.perf_counter() - started
    results["total_seconds"] = round(seconds, 1)
    settings = {
        "device_name": device_name(device),
        "device": device.type,
        "config": _relative(args.config),
        "archs": list(by_arch),
        "overrides": [*(TINY_SET if args.tiny else []), *args.set],
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "data": "generated scenes (data.kind=scenes), random-init weights",
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "tiny": args.tiny,
        "note": "CPU dry run at tiny sizes: checks the script, not a measurement" if args.tiny else None,
        "extrapolation": f"{RECIPE_EPOCHS} epochs x {COCO_TRAIN_IMAGES} COCO train2017 images at min(best step rate, loader rate)",
    }
    goal = {"target": f"finishes in <= {TIME_LIMIT_S} s", "met": seconds <= TIME_LIMIT_S}
    out = args.out or default_path("gpu_check", device.type)
    write_result(make_result("gpu_check", settings, results, goal=goal, machine=machine), out)
    hours = f"~ {estimate['recipe_gpu_hours']:.1f} GPU-hours" if estimate else "not estimated (no train step ran)"
    print(
        f"{settings['device_name']}: 25-epoch COCO recipe of {first['arch']} {hours} "
        f"(paper: {PAPER_GPU_HOURS:.0f}); {seconds:.0f}s in all; {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
