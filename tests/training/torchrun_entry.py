"""torchrun entry point for tests/training/test_multinode.py (`torchrun ... -m tests.training.torchrun_entry`).

It runs `training/run.py`'s own `main` (argument parsing, config loading, `init_distributed` from
the environment torchrun sets, the training loop, rank-0 checkpoint and artefact), with two test
changes: the 2-block ViT-S of tests/training/tiny.py, so two CPU "nodes" finish in seconds, and a
dump of this rank's final student, teacher and queue to `$NECO_RANK_DUMP_DIR/rank<RANK>.pt`,
because only rank 0 writes checkpoints and the test must compare what every rank holds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from neco.training import trainer as trainer_module
from neco.training.run import main
from tests.training.tiny import tiny_backbone

DUMP_DIR_ENV = "NECO_RANK_DUMP_DIR"


def run(argv: list[str]) -> int:
    torch.set_num_threads(1)
    trainer_module.create_backbone = tiny_backbone
    captured: dict[str, Any] = {}
    original = trainer_module.Trainer.state_dict

    def capture(self: trainer_module.Trainer) -> dict[str, Any]:
        state = original(self)  # called on every rank at each checkpoint step; the last one wins
        captured.update(
            student=state["student"],
            teacher=state["teacher"],
            queue=state["queue"],
            step=state["trained_step"],
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        return state

    trainer_module.Trainer.state_dict = capture  # type: ignore[method-assign]
    code = main(argv)
    torch.save(captured, Path(os.environ[DUMP_DIR_ENV]) / f"rank{os.environ['RANK']}.pt")
    return code


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
