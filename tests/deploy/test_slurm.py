"""deploy/slurm/train.sbatch run outside SLURM: `scontrol` and `srun` are stubs on PATH, so the test
sees the exact command each node would run and parses it with torchrun's and training/run.py's
own argument parsers. Resume is passed only once output_dir holds a checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torch.distributed.run import get_args_parser

from neco.training.run import build_arg_parser

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "slurm" / "train.sbatch"


def submit(tmp_path: Path, *train_args: str) -> list[str]:
    """Run the batch script as SLURM would on a 2-node, 4-GPU-per-node allocation; return srun's argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n'
    )
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/srun.args"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_JOB_ID": "4242",
        "NECO_PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), *train_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return (tmp_path / "srun.args").read_text().splitlines()


def test_each_node_runs_one_torchrun_agent_with_a_c10d_rendezvous(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    argv = submit(tmp_path, "configs/train_smoke.yaml", f"output_dir={output_dir}", "optim.steps=2")
    assert argv[:2] == ["--kill-on-bad-exit=1", sys.executable] and argv[2:4] == ["-m", "torch.distributed.run"]
    launch = get_args_parser().parse_args(argv[4:])
    assert (launch.nnodes, launch.nproc_per_node) == ("2", "4")
    assert (launch.rdzv_backend, launch.rdzv_endpoint, launch.rdzv_id) == ("c10d", "gpu07:29500", "neco-4242")
    assert launch.training_script == "training/run.py"
    train = build_arg_parser().parse_args(launch.training_script_args)
    assert train.config == Path("configs/train_smoke.yaml") and train.resume is False
    assert train.overrides == [f"output_dir={output_dir}", "optim.steps=2"]

    (output_dir / "checkpoints").mkdir(parents=True)
    (output_dir / "checkpoints" / "step_00000002.pt").touch()
    argv = submit(tmp_path, "configs/train_smoke.yaml", f"output_dir={output_dir}")
    assert build_arg_parser().parse_args(get_args_parser().parse_args(argv[4:]).training_script_args).resume is True
