"""Running a sweep: locally (in sequence or N processes at a time) or as a SLURM array job.

A run is done when its summary.json reports train.max_steps; it resumes (`--resume`) when its
directory holds checkpoints; otherwise it starts fresh. Each local run's output goes to
<sweep root>/logs/<run>.log. With N at a time, each process gets an equal share of the cores.

A killed sweep is rerun as it was: finished runs are skipped, interrupted ones resume. Each
running `megamoe train` holds <sweep root>/logs/<run>.lock, so a second sweep of the same file
waits for it (and says so) instead of training the same run twice; and it gets SIGTERM (save a
checkpoint and stop) if the sweep process dies, so no orphan trains on beside a rerun.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from megamoe.sweep.spec import Run, Sweep
from megamoe.train.checkpoint import latest_checkpoint
from megamoe.utils.locks import note_holder, open_locked

PR_SET_PDEATHSIG = 1

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "sweep_array.sbatch"


def status(run: Run) -> str:
    """done, resume or new."""
    summary = run.run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("step", -1) >= run.cfg.train.max_steps:
        return "done"
    return "resume" if latest_checkpoint(run.run_dir) is not None else "new"


def train_command(run: Run) -> list[str]:
    """The `megamoe train` command line of a run (with --resume when it has checkpoints)."""
    resume = ["--resume"] if status(run) == "resume" else []
    return [sys.executable, "-m", "megamoe", "train", *run.args, *resume]


def run_local(sweep: Sweep, parallel: int, echo=print) -> dict[str, int]:
    """Run every unfinished run, `parallel` at a time; returns each launched run's exit status."""
    todo = [r for r in sweep.runs if status(r) != "done"]
    echo(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} done, {len(todo)} to run")
    logs = sweep.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
    active: dict[str, subprocess.Popen] = {}
    results: dict[str, int] = {}
    while todo or active:
        while todo and len(active) < parallel:
            run = todo.pop(0)
            proc = _launch(run, logs, env, echo)
            if proc is not None:
                active[run.name] = proc
        for name, proc in list(active.items()):
            if proc.poll() is not None:
                results[name] = proc.returncode
                echo(f"  {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} {name}")
                del active[name]
        time.sleep(0.5)
    return results


def _launch(run: Run, logs: Path, env: dict[str, str], echo) -> subprocess.Popen | None:
    """Start one run's `megamoe train` holding the run's lock; None if it turned out done meanwhile."""

    def waiting(seconds: float, holder: str) -> None:
        echo(f"  waiting ({seconds:.0f} s so far) for {run.name}: another sweep is running it ({holder})")

    lock = open_locked(logs / f"{run.name}.lock", waiting)
    try:
        state = status(run)  # again, under the lock: another sweep may have finished it
        if state == "done":
            echo(f"  skip {run.name} (finished by another sweep)")
            return None
        echo(f"  start {run.name} ({state})")
        with open(logs / f"{run.name}.log", "a") as log:
            proc = subprocess.Popen(
                train_command(run), stdout=log, stderr=subprocess.STDOUT, env=env,
                pass_fds=(lock.fileno(),), preexec_fn=_stop_with_parent(os.getpid()),
            )  # fmt: skip
        note_holder(lock, f"megamoe train pid {proc.pid}, started by sweep pid {os.getpid()}")
        return proc
    finally:
        lock.close()  # the child holds its inherited copy of the lock until it exits


def _stop_with_parent(parent: int):
    """A preexec_fn: the child gets SIGTERM (checkpoint and stop) when the sweep process dies; None off Linux."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None
    if prctl is None:
        return None

    def apply() -> None:  # runs in the child between fork and exec: nothing but system calls here
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return apply


def sbatch_script(sweep: Sweep, parallel: int, gpus: int, time_limit: str) -> tuple[str, str]:
    """(the array job script, the runs file's text): one line of `megamoe train` arguments per run."""
    runs_file = sweep.root / "runs.txt"
    fills = {
        "@@NAME@@": f"megamoe-{sweep.name}",
        "@@ARRAY@@": f"0-{len(sweep.runs) - 1}%{parallel}",
        "@@GPUS@@": str(gpus),
        "@@TIME@@": time_limit,
        "@@LOGS@@": str(sweep.root / "logs"),
        "@@RUNS_FILE@@": str(runs_file),
    }
    script = TEMPLATE.read_text()
    for key, value in fills.items():
        script = script.replace(key, value)
    lines = "".join(shlex.join(run.args) + "\n" for run in sweep.runs)
    return script, lines


def submit(sweep: Sweep, script: str, runs_text: str, options: list[str] | None = None) -> str:
    """Write the runs file and the script under the sweep root, then sbatch it; returns sbatch's output.

    options: sbatch command-line options; they override the script's #SBATCH lines (a CPU node:
    --gpus-per-node=0 --cpus-per-task=N).
    """
    from megamoe.errors import MegamoeError

    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)
    (sweep.root / "runs.txt").write_text(runs_text)
    path = sweep.root / "sweep.sbatch"
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", *(options or []), str(path)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise MegamoeError("--slurm: sbatch not found; run on a SLURM login node, or use --dry-run") from None
    except subprocess.CalledProcessError as err:
        raise MegamoeError(f"--slurm: sbatch failed: {err.stderr.strip()}") from None
    return out.stdout.strip()
