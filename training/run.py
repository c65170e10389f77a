"""Run NeCo post-pretraining: `python training/run.py --config configs/X.yaml [key=value ...]`.

Also importable (`neco.training.run.train(cfg) -> artefact dir`), reachable as `neco train` and
`python -m neco.training`, and launchable with `torchrun --nproc-per-node N training/run.py`.
Outputs under `cfg.output_dir`: `checkpoints/step_XXXXXXXX.pt` (resumable), `tensorboard/`,
`curve.jsonl` + `curve.png` (loss and learning rate against the step, `neco.training.curve`),
and `artefact/` (backbone.safetensors + metadata.json) for `neco export`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: drop training/ from sys.path so its modules cannot shadow stdlib/top-level ones.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import logging
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from neco.contract import ARCHS, ModelContract, split_model_id
from neco.errors import run_reporting_errors
from neco.model import read_artefact_contract, resolve_device, save_artefact
from neco.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest_valid,
    remove_stale_files,
    save_checkpoint,
)
from neco.training.config import TrainConfig, load_train_config
from neco.training.curve import CURVE_FILE, CURVE_PICTURE, append_point, keep_until, write_picture
from neco.training.data import ImageFolderSource, NeCoDataset, ResumableBatchSampler, SceneSource, make_loader
from neco.training.distributed import DistInfo, barrier, init_distributed, mean_over_ranks, shutdown
from neco.training.run_args import add_train_arguments
from neco.training.trainer import Trainer
from neco.training.views import MultiCropViews

__all__ = ["TrainConfig", "train", "main"]

log = logging.getLogger("neco.training")

ARTEFACT_DIR = "artefact"
CHECKPOINT_DIR = "checkpoints"


def model_contract(cfg: TrainConfig) -> ModelContract:
    """The trained model's contract: its architecture's facts and the normalisation of its start weights.

    A timm id with a tag (`vit_large_patch16_dinov3.sat493m`) or an artefact directory says
    which statistics the weights were trained with; the crops are standardised with them and
    the exported artefact carries them on.
    """
    m = cfg.model
    if m.weights is not None and split_model_id(m.weights)[0] in ARCHS:
        return ModelContract.for_arch(m.weights)
    contract = ModelContract.for_arch(m.arch)
    if m.weights is not None and Path(m.weights).is_dir():
        start = read_artefact_contract(m.weights)
        contract = contract.model_copy(update={"mean": start.mean, "std": start.std})
    return contract


def build_dataset(cfg: TrainConfig) -> NeCoDataset:
    d = cfg.data
    if d.kind == "folder":
        assert d.root is not None
        source: ImageFolderSource | SceneSource = ImageFolderSource(d.root)
    else:
        source = SceneSource(d.scenes_count, d.scenes_size, d.scenes_classes, cfg.seed)
    return NeCoDataset(source, MultiCropViews(cfg.crops, model_contract(cfg)))


def _resume_state(cfg: TrainConfig, resume: bool | str | Path) -> dict | None:
    """The state to resume from: the newest valid checkpoint (corrupt newer ones are skipped
    with a warning) or exactly the file given."""
    if resume is False:
        return None
    if resume is True:
        path, state = load_latest_valid(cfg.output_dir / CHECKPOINT_DIR)
    else:
        path = Path(resume)
        state = load_checkpoint(path)
    if state["config"]["model"] != cfg.to_dict()["model"]:
        raise CheckpointError(f"{path} was trained with a different model section; refusing to resume")
    log.info("resuming from %s (step %d)", path, state["trained_step"])
    return state


def train(cfg: TrainConfig, resume: bool | str | Path = False, stop_at: int | None = None) -> Path:
    """Run (or resume) post-pretraining; returns the export artefact directory.

    `stop_at` ends the run after that optimiser step (checkpointed, schedules unchanged), for
    time-limited jobs that continue later with `resume=True`.
    """
    device = resolve_device(cfg.runtime.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    if cfg.runtime.threads is not None:
        torch.set_num_threads(cfg.runtime.threads)
    try:
        return _train(cfg, resume, device, dist_info, stop_at)
    finally:
        shutdown(dist_info)


def _train(
    cfg: TrainConfig, resume: bool | str | Path, device: torch.device, dist_info: DistInfo, stop_at: int | None
) -> Path:
    if dist_info.is_main:
        remove_stale_files(cfg.output_dir / CHECKPOINT_DIR)  # temporaries of writes a crash interrupted
    state = _resume_state(cfg, resume)
    dataset = build_dataset(cfg)
    total = cfg.total_steps(len(dataset), dist_info.world_size)
    torch.manual_seed(cfg.seed)  # identical student, head and teacher initialisation on every rank
    trainer = Trainer(cfg, total, device, dist_info)
    torch.manual_seed(cfg.seed + 1 + dist_info.rank)  # per-rank drop-path/reference draws; resumed from state
    if state is not None:
        trainer.load_state_dict(state)
    accumulation = cfg.optim.accumulation
    sampler = ResumableBatchSampler(
        len(dataset),
        cfg.optim.batch_size,
        seed=cfg.seed,
        start_step=trainer.step * accumulation,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    loader = iter(make_loader(dataset, sampler, cfg.data, pin_memory=device.type == "cuda"))
    curve = cfg.output_dir / CURVE_FILE
    if dist_info.is_main:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        keep_until(curve, trainer.step)
    writer = None
    if dist_info.is_main and cfg.runtime.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.output_dir / "tensorboard"), purge_step=trainer.step)
    bar = tqdm(
        total=total,
        initial=trainer.step,
        disable=not (dist_info.is_main and cfg.runtime.progress),
        desc="neco train",
        dynamic_ncols=True,
    )
    images_per_step = cfg.optim.batch_size * accumulation * dist_info.world_size
    skipped, tick = 0, time.perf_counter()
    checkpoints = cfg.output_dir / CHECKPOINT_DIR
    end = total if stop_at is None else min(total, stop_at)
    while trainer.step < end:
        batches = [next(loader) for _ in range(accumulation)]
        skipped += int(sum(int(b["skipped"].sum()) for b in batches))
        stats = trainer.train_step(batches)
        now = time.perf_counter()
        stats["img_per_s"] = images_per_step / max(now - tick, 1e-9)
        tick = now
        stats["loss"] = float(mean_over_ranks(torch.tensor(stats["loss"], device=device), dist_info))
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", img_s=f"{stats['img_per_s']:.1f}")
        logged = trainer.step % cfg.runtime.log_every == 0 or trainer.step == total
        if dist_info.is_main and logged:
            append_point(curve, trainer.step, stats["loss"], stats["lr"])
        if writer is not None and logged:
            for key, value in stats.items():
                writer.add_scalar(f"train/{key}", value, trainer.step)
            writer.add_scalar("data/skipped_images", skipped, trainer.step)
        if trainer.step % cfg.runtime.checkpoint_every == 0 or trainer.step == end:
            ckpt_state = trainer.state_dict()  # every rank: RNG states are gathered collectively
            if dist_info.is_main:
                save_checkpoint(checkpoints, trainer.step, ckpt_state, keep=cfg.runtime.keep_checkpoints)
    bar.close()
    if writer is not None:
        writer.close()
    if skipped:
        log.warning("skipped %d unreadable images during training", skipped)
    artefact = cfg.output_dir / ARTEFACT_DIR
    if dist_info.is_main:
        save_artefact(trainer.model.backbone, model_contract(cfg), artefact, cfg.to_dict())
        log.info("training curve: %s", write_picture(curve, cfg.output_dir / CURVE_PICTURE))
    barrier(dist_info)
    return artefact


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training/run.py", description="NeCo post-pretraining of DINOv2 and DINOv3")
    return add_train_arguments(parser)


def run_from_args(args: argparse.Namespace) -> int:
    """Shared by the script, `python -m neco.training` and `neco train`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_train_config(args.config, args.overrides)
    artefact = train(cfg, resume=args.resume, stop_at=args.stop_at)
    print(f"artefact: {artefact}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    return run_reporting_errors("training/run.py", lambda: run_from_args(args))


if __name__ == "__main__":
    raise SystemExit(main())
