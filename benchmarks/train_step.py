"""NeCo training-step throughput: images/s, where a step's time goes, memory, loader speed, MFU.

    python benchmarks/train_step.py                               # CPU, configs/train_smoke.yaml
    python benchmarks/train_step.py --device cuda \\
        --config configs/train_vits14_reg_coco224.yaml --set data.kind=scenes model.weights=null

The step is the real `Trainer.train_step` (teacher + student forward, ROI-align + similarity +
soft sort + cross-entropy, backward, AdamW + EMA). Phases are timed with CUDA synchronisation,
so on GPU the split is exact but the total is slightly pessimistic. "data" is the time the step
waited for the loader; the loader's own throughput is measured separately over the same
dataset and workers. Model FLOPs per step are counted by `torch.utils.flop_counter` on one
real step (forward + backward); MFU = counted FLOPs / step time / peak bf16 dense FLOP/s.
Writes a table to stdout and the result file (`benchmarks/common.py` schema) to
benchmarks/results/train_step_<device>.json or --out: `settings` holds the config, overrides and
the step's shape, `results` one mapping of the measured figures, `goal` is null.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from common import default_path, machine_info, make_result, write_result
from torch.utils.flop_counter import FlopCounterMode

from neco.training.config import load_train_config
from neco.training.data import ResumableBatchSampler, make_loader
from neco.training.run import build_dataset
from neco.training.trainer import PhaseTimer, Trainer

REPO = Path(__file__).resolve().parents[1]

PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
"""Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets (SXM parts)."""


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_DENSE.items() if key in name), None)


def loader_throughput(dataset, cfg, batches: int) -> float:
    sampler = ResumableBatchSampler(len(dataset), cfg.optim.batch_size, seed=cfg.seed)
    loader = iter(make_loader(dataset, sampler, cfg.data, pin_memory=False))
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * cfg.optim.batch_size / (time.perf_counter() - start)


def measure_steps(cfg, dataset, device: torch.device, steps: int, warmup: int) -> dict[str, object]:
    """Time `steps` real `Trainer.train_step`s after `warmup` untimed ones (compile, queue fill).

    Model FLOPs per step are counted on an eager twin first: the counter cannot see inside
    compiled graphs. The schedule's horizon is 100x the steps run, so lr and momentum stay near
    their start values. Shared by this benchmark and benchmarks/gpu_check.py.
    """
    sampler = ResumableBatchSampler(len(dataset), cfg.optim.batch_size, seed=cfg.seed)
    loader = iter(make_loader(dataset, sampler, cfg.data, pin_memory=device.type == "cuda"))
    accumulation = cfg.optim.accumulation
    horizon = max(steps + warmup, 1) * 100
    eager_cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"compile": False})})
    counting = Trainer(eager_cfg, horizon, device)
    with FlopCounterMode(display=False) as counter:
        counting.train_step([next(loader) for _ in range(accumulation)])
    del counting
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trainer = Trainer(cfg, horizon, device)
    warm = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step([next(loader) for _ in range(accumulation)])
    warmup_s = time.perf_counter() - warm
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    trainer.timer = timer = PhaseTimer(device)
    start = time.perf_counter()
    for _ in range(steps):
        with timer("data"):
            batches = [next(loader) for _ in range(accumulation)]
        trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "elapsed_s": time.perf_counter() - start,
        "warmup_s": warmup_s,
        "phase_s": dict(timer.seconds),
        "flops_per_step": counter.get_total_flops(),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "train_smoke.yaml")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile, queue fill)")
    parser.add_argument("--loader-batches", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s if the GPU is not known")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    precision = "bf16" if args.device == "cuda" else "fp32"
    cfg = load_train_config(args.config, [f"runtime.device={args.device}", f"runtime.precision={precision}", *args.set])
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    machine = {**machine_info(), "torch_threads": torch.get_num_threads()}  # load average before the timed work
    dataset = build_dataset(cfg)
    loader_ips = loader_throughput(dataset, cfg, args.loader_batches)

    measured = measure_steps(cfg, dataset, device, args.steps, args.warmup)
    elapsed, timer_seconds, flops_per_step = measured["elapsed_s"], measured["phase_s"], measured["flops_per_step"]
    accumulation = cfg.optim.accumulation

    images = args.steps * cfg.optim.batch_size * accumulation
    step_s = elapsed / args.steps
    peak = peak_flops(device, args.peak_tflops)
    settings = {
        "config": str(args.config),
        "overrides": args.set,
        "device": args.device,
        "precision": precision,
        "arch": cfg.model.arch,
        "batch_size": cfg.optim.batch_size,
        "accumulation": accumulation,
        "crops": {"global": cfg.crops.global_size, "local": cfg.crops.local_size, "num_local": cfg.crops.num_local},
        "grid_patches": cfg.method.grid_size**2,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "loader_batches": args.loader_batches,
        "loader_workers": cfg.data.num_workers,
        "peak_flops": peak,
        "phase_note": "sorter = ROI-align + similarity + soft sort + cross-entropy (forward); its backward is in backward",
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
    }
    result = {
        "images_per_s": images / elapsed,
        "step_s": step_s,
        "phase_s_per_step": {name: secs / args.steps for name, secs in timer_seconds.items()},
        "loader_images_per_s": loader_ips,
        "model_flops_per_step": flops_per_step,
        "achieved_tflops": flops_per_step / step_s / 1e12,
        "mfu": flops_per_step / step_s / peak if peak else None,
        "peak_memory_mib": (
            measured["peak_memory_mib"]
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }
    print(f"{'metric':<28}{'value':>14}")
    for key in ("images_per_s", "step_s", "loader_images_per_s", "achieved_tflops", "mfu", "peak_memory_mib"):
        value = result[key]
        print(f"{key:<28}{'n/a' if value is None else f'{value:14.4g}':>14}")
    for name, secs in result["phase_s_per_step"].items():
        print(f"{'  ' + name + ' s/step':<28}{secs:14.4g}")
    document = make_result("train_step", settings, result, goal=None, machine=machine)
    write_result(document, args.out or default_path("train_step", args.device))


if __name__ == "__main__":
    main()
