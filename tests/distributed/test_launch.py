"""The launchers: launch/torchrun.sh trains and survives preemption; launch/slurm.sbatch builds the right command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from megamoe.train.checkpoint import list_checkpoints
from tests.distributed.helpers import REPO
from tests.util import TINY


def env(**extra: str) -> dict[str, str]:
    """The test environment plus launcher variables."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": os.environ.get("PYTHON", "python3"), **extra}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Block until the run has logged `step` (or fail if it exited or took too long)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} did not reach step {step}")


def test_torchrun_script_preempt_and_resume(data_cache, tiny_data, tmp_path):
    """SIGTERM to torchrun: every rank stops at the same step and saves; --resume finishes the run."""
    import sys

    run_dir = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={data_cache}", f"train.run_dir={run_dir}", "parallel.tensor_parallel=2",
            "train.max_steps=100000", "train.checkpoint_interval=0", "train.eval_interval=0"]  # fmt: skip
    launcher = env(NPROC="2", PYTHON=sys.executable)
    proc = subprocess.Popen(["launch/torchrun.sh", *args], cwd=REPO, env=launcher, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    saved = list_checkpoints(run_dir)
    assert len(saved) == 1, err[-3000:]
    step = json.loads((saved[0] / "meta.json").read_text())["step"]
    assert f"stopped by SIGTERM at step {step}" in out
    done = subprocess.run(["launch/torchrun.sh", str(run_dir), "--resume", f"train.max_steps={step + 2}"],
                          cwd=REPO, env=launcher, text=True, capture_output=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == step + 2


def test_slurm_script_dry_run(tmp_path):
    """The sbatch script parses, runs our torchrun (it survives SIGUSR1) with rendezvous on the first node, keys the
    run dir by job id, resumes when it can."""
    script = REPO / "launch" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    slurm = env(DRY_RUN="1", SLURM_JOB_ID="42", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a", GPUS_PER_NODE="8",
                RUN_DIR=str(tmp_path / "run"))  # fmt: skip
    cmd = subprocess.run(["bash", str(script), "configs/debug/cpu_tiny.yaml", "parallel.tensor_parallel=2"],
                         env=slurm, capture_output=True, text=True, cwd=REPO).stdout  # fmt: skip
    assert cmd.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 ")
    launch = "-m megamoe.cli.torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu-a:29500"
    assert f"{launch} --rdzv-id 42 -m megamoe train configs/debug/cpu_tiny.yaml" in cmd
    assert f"train.run_dir={tmp_path / 'run'}" in cmd and "--resume" not in cmd
    (tmp_path / "run" / "checkpoints" / "step_00000010").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000010" / "meta.json").write_text("{}")
    cmd = subprocess.run(["bash", str(script), "configs/debug/cpu_tiny.yaml"], env=slurm, capture_output=True,
                         text=True, cwd=REPO).stdout  # fmt: skip
    assert cmd.strip().endswith("--resume")
