"""One NeCo optimisation step and the state that a checkpoint must capture.

`Trainer` owns the student (DDP-wrapped when distributed), the EMA teacher, the reference
queue, the loss and the optimiser. `train_step` consumes `accumulation` micro-batches and
performs one optimiser step; `state_dict`/`load_state_dict` round-trip everything needed for
bit-identical resumption on CPU. Phases can be timed (`PhaseTimer`) for the benchmark.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from neco.model import create_backbone, freeze_all_but_last_blocks, load_backbone
from neco.training.config import TrainConfig
from neco.training.distributed import DistInfo, all_gather_cat, gather_objects
from neco.training.ema import ema_update, make_teacher, momentum_at
from neco.training.head import ProjectionHead
from neco.training.method import NeCoLoss, NeCoNet
from neco.training.optim import Schedule, apply_schedule, build_optimizer
from neco.training.reference_queue import ReferenceQueue
from neco.training.sorting import SoftSorter


class PhaseTimer:
    """Accumulates wall time per named phase; synchronises CUDA so GPU work is attributed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start


def build_student(cfg: TrainConfig) -> NeCoNet:
    """Backbone (random, or loaded from `model.weights`) + projection head."""
    m = cfg.model
    backbone = create_backbone(m.arch, drop_path_rate=m.drop_path_rate)
    if m.weights is not None:
        loaded, _ = load_backbone(m.weights, arch=m.arch)
        backbone.load_state_dict(loaded.state_dict())
    freeze_all_but_last_blocks(backbone, m.train_last_blocks)
    head = ProjectionHead(backbone.embed_dim, m.head_hidden_dim, m.head_out_dim, m.head_layers)
    return NeCoNet(backbone, head, keep_registers=m.keep_registers)


class Trainer:
    """Student/teacher/queue/optimiser for one run on one rank."""

    def __init__(
        self, cfg: TrainConfig, total_steps: int, device: torch.device, dist_info: DistInfo = DistInfo()
    ) -> None:
        self.cfg, self.total_steps, self.device, self.dist = cfg, total_steps, device, dist_info
        self.step = 0
        self.timer: PhaseTimer | None = None
        self.model = build_student(cfg).to(device)
        if cfg.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.teacher = make_teacher(self.model)
        method = cfg.method

        def sorter(steepness: float) -> SoftSorter:
            return SoftSorter(
                method.sort_network,
                steepness=steepness,
                art_lambda=method.art_lambda,
                distribution=method.distribution,
                check_finite=False,
            )

        self.loss_fn = NeCoLoss(
            sorter(method.student_steepness),
            sorter(method.teacher_steepness),
            patch_size=self.model.patch_size,
            similarity=method.similarity,
            grid_size=method.grid_size,
            mask_mode=method.mask_mode,
            mask_threshold=method.attention_threshold,
            mask_connectivity=method.mask_connectivity,
        )
        self.queue = ReferenceQueue(2, method.queue_length, cfg.model.head_out_dim, device)
        o = cfg.optim
        self.schedule = Schedule(total_steps, o)
        self.optimizer = build_optimizer(
            self.model.backbone, self.model.head, self.schedule, fused=device.type == "cuda"
        )
        self.student: nn.Module = self.model
        if dist_info.enabled:
            self.student = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.runtime.compile:
            self.student = torch.compile(self.student)
            self.teacher_forward = torch.compile(self.teacher.encode)
        else:
            self.teacher_forward = self.teacher.encode

    def _phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        enabled = self.device.type == "cuda" and self.cfg.runtime.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def micro_step(self, batch: dict[str, Tensor], scale: float) -> Tensor:
        """Forward + backward of one micro-batch; returns its (unscaled) loss."""
        method = self.cfg.method
        images_g = batch["global"].transpose(0, 1).flatten(0, 1)  # [2B, 3, G, G], view-major
        images_l = batch["local"].transpose(0, 1).flatten(0, 1)  # [NB, 3, L, L]
        boxes, flips = batch["boxes"], batch["flips"]
        num_local = batch["local"].shape[1]
        memory = torch.channels_last if self.cfg.runtime.channels_last else torch.contiguous_format
        images_g, images_l = images_g.contiguous(memory_format=memory), images_l.contiguous(memory_format=memory)
        with self._phase("forward"), self._autocast():
            with torch.no_grad():
                teacher_maps, attention = self.teacher_forward(images_g, method.mask_mode != "all")
            groups = (images_g, images_l) if num_local else (images_g,)
            student_out = self.student(*groups)
        teacher_views = list(teacher_maps.float().chunk(2))
        student_views = list(student_out[0].chunk(2)) + (list(student_out[1].chunk(num_local)) if num_local else [])
        teacher_patches = [t.flatten(2).transpose(1, 2) for t in teacher_views]  # [B, hw, D]
        masks = self.loss_fn.patch_masks(None if attention is None else list(attention.chunk(2)))
        patch_masks = [None, None] if masks is None else [m.flatten(1) for m in masks]  # [B, hw]
        references = self._references(teacher_patches, patch_masks, len(student_views))
        with self._phase("sorter"), self._autocast():
            loss = self.loss_fn(student_views, teacher_views, boxes, flips, references, masks)
        with self._phase("backward"):
            (loss * scale).backward()
        for g in range(2):
            self.queue.push_from(
                g,
                teacher_patches[g],
                method.queue_push_per_image,
                lambda t: all_gather_cat(t, self.dist),
                patch_masks[g],
            )
        return loss.detach()

    def _references(self, teacher_patches: list[Tensor], masks: list[Tensor | None], num_views: int) -> Tensor:
        """[pairs, B, R, D] references in `crop_pairs` order: fresh per pair, or shared per global crop.

        In the fg/bg modes they are drawn among the masked patches only (as the reference's
        queue holds only those)."""
        method, per_global = self.cfg.method, num_views - 1
        fresh = method.reference_draw == "pair"
        sets = []
        for g, patches in enumerate(teacher_patches):
            drawn = self.queue.references(g, patches, method.num_references, per_global if fresh else 1, masks[g])
            sets.append(drawn if fresh else drawn.expand(per_global, -1, -1, -1))
        return torch.cat(sets)

    def train_step(self, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """One optimiser step over `len(batches)` accumulated micro-batches."""
        lr = apply_schedule(self.optimizer, self.schedule, self.step)
        losses = []
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or not isinstance(self.student, DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.student.no_sync():  # type: ignore[operator]
                losses.append(self.micro_step(self.to_device(batch), 1.0 / len(batches)))
        with self._phase("optimizer"):
            # The norm is logged with or without clipping (the recipe does not clip); an infinite bound
            # only measures it (the clipping coefficient is clamped to 1).
            clip = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            momentum = momentum_at(
                self.step, self.total_steps, self.cfg.method.teacher_momentum, self.cfg.method.teacher_momentum_end
            )
            ema_update(self.teacher, self.model, momentum)
        return {
            "loss": float(torch.stack(losses).mean()),
            "lr": lr,
            "momentum": momentum,
            "grad_norm": float(grad_norm),
            "queue_full": float(self.queue.full(0)),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: weights, optimiser, queue, step, per-rank RNG states."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "arch": self.cfg.model.arch,
            "config": self.cfg.to_dict(),
            "total_steps": self.total_steps,
            "student": self.model.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "queue": self.queue.state_dict(),
            "rng": gather_objects(rng, self.dist),
            "trained_step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.queue.load_state_dict(state["queue"])
        self.step = int(state["trained_step"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:  # a different world size cannot reproduce the stream anyway
            torch.set_rng_state(rngs[self.dist.rank]["torch"])
            if self.device.type == "cuda" and "cuda" in rngs[self.dist.rank]:
                torch.cuda.set_rng_state(rngs[self.dist.rank]["cuda"], self.device)
