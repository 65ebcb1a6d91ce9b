"""Helpers for the real-SLURM tests: bring-up, job environment, job state, bounded waits with diagnostics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UP = REPO / "tools" / "slurm" / "up.sh"
CANNOT_RUN_HERE = 2
"""tools/slurm/up.sh's exit status when this machine cannot host SLURM (not root, no apt, no network)."""


def cannot_run(reason: str) -> None:
    """Skip: this machine cannot host SLURM. Fail instead where CI requires it (MEGAMOE_REQUIRE_SLURM=1)."""
    if os.environ.get("MEGAMOE_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEGAMOE_REQUIRE_SLURM=1, but {reason}")
    pytest.skip(reason)


def bring_up() -> None:
    """Run tools/slurm/up.sh; skip where the machine cannot host SLURM, fail where bring-up broke."""
    if os.geteuid() != 0:
        cannot_run("the SLURM tests need root: tools/slurm/up.sh installs packages and starts daemons")
    res = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=900)
    if res.returncode == CANNOT_RUN_HERE:
        cannot_run(res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, f"tools/slurm/up.sh failed:\n{res.stdout}\n{res.stderr}"


def job_env(**extra: str) -> dict[str, str]:
    """The environment a job runs in (sbatch exports it): this venv first, gloo-friendly threads, cached ops."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",  # gloo ranks on 2 cores: more threads only contend
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def run(*cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """A SLURM client command's stdout (fails the test with its stderr)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}"
    return res.stdout


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` of one job (or array task, `ID_TASK`) as a dict; empty once SLURM forgot it."""
    res = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
    first = res.stdout.splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""
    return dict(re.findall(r"(\w+)=(\S*)", first))


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a train/loss row in a run's metrics.jsonl (so far)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r["step"] for r in rows if "train/loss" in r]


def diagnostics(jobs: list[str], logs: list[Path]) -> str:
    """squeue, scontrol show job and the job logs' tails: what a failed wait prints."""
    parts = [subprocess.run(["squeue"], capture_output=True, text=True).stdout]
    for job in jobs:
        parts.append(subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout)
    for log in logs:
        text = log.read_text(errors="replace") if log.is_file() else "(no file)"
        parts.append(f"--- {log} (last 4000 chars)\n{text[-4000:]}")
    return "\n".join(parts)


def wait_until(what: str, ready: Callable[[], bool], timeout: float, jobs: list[str], logs: list[Path]) -> None:
    """Poll ready() until it holds; after timeout seconds fail with the cluster's and the jobs' state."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnostics(jobs, logs)}")
        time.sleep(0.2)
