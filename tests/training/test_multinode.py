"""Multi-node training on one machine: two torchrun agents (2 nodes x 1 process, gloo) meet through a
c10d rendezvous on loopback, as `torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`
does across real nodes (docs/scaling.md), train the tiny config and must end bit-identical.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from neco.contract import ARTEFACT_WEIGHTS
from neco.training.checkpoint import latest_checkpoint, load_checkpoint
from tests.training.tiny import tiny_config
from tests.training.torchrun_entry import DUMP_DIR_ENV

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent(port: int, config: Path, dump_dir: Path, log: Path) -> subprocess.Popen:
    """One torchrun agent, i.e. what each node of a real job starts (see deploy/slurm/train.sbatch)."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "neco-multinode-test",
        "--local-addr", "127.0.0.1", "--max-restarts", "0",
        "-m", "tests.training.torchrun_entry", "--config", str(config),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        DUMP_DIR_ENV: str(dump_dir),
    }
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}.{key} differs between ranks"


@pytest.mark.slow
def test_two_torchrun_agents_on_loopback_train_in_lockstep(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", optim={"steps": STEPS}, runtime={"checkpoint_every": STEPS})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    port = _free_port()
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    agents = [_agent(port, config, tmp_path, log) for log in logs]
    try:
        codes = [agent.wait(timeout=150) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    dumps = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [(d["rank"], d["world_size"], d["step"]) for d in dumps] == [(0, 2, STEPS), (1, 2, STEPS)]
    r0, r1 = dumps
    _assert_states_equal(r0["student"], r1["student"], "student")
    _assert_states_equal(r0["teacher"], r1["teacher"], "teacher")
    assert torch.equal(r0["queue"]["buffer"], r1["queue"]["buffer"])
    assert r0["queue"]["pointer"] == r1["queue"]["pointer"] and r0["queue"]["count"] == r1["queue"]["count"]
    # both nodes' pushes reached the queue: steps x nodes x images per rank x patches per image
    method, batch = cfg.method, cfg.optim.batch_size
    assert r0["queue"]["count"] == [min(method.queue_length, STEPS * 2 * batch * method.queue_push_per_image)] * 2
    # the EMA teacher moved away from the student, identically on both nodes (the check above)
    assert any(not torch.equal(r0["teacher"][k], r0["student"][k]) for k in r0["teacher"] if k in r0["student"])

    # rank 0's checkpoint is the state both ranks hold, and its artefact is exported
    checkpoint = load_checkpoint(latest_checkpoint(cfg.output_dir / "checkpoints"))
    assert checkpoint["trained_step"] == STEPS and len(checkpoint["rng"]) == 2
    _assert_states_equal(checkpoint["student"], r1["student"], "checkpoint student")
    _assert_states_equal(checkpoint["teacher"], r1["teacher"], "checkpoint teacher")
    assert (cfg.output_dir / "artefact" / ARTEFACT_WEIGHTS).is_file()
