"""Running a sweep: locally (in sequence or N processes at a time) or as a SLURM array job.

A run is done when its summary.json reports train.max_steps; it resumes (`--resume`) when its
directory holds checkpoints; otherwise it starts fresh. Each local run's output goes to
<sweep root>/logs/<run>.log. With N at a time, each process gets an equal share of the cores.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from megamoe.sweep.spec import Run, Sweep
from megamoe.train.checkpoint import latest_checkpoint

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
            echo(f"  start {run.name} ({status(run)})")
            with open(logs / f"{run.name}.log", "a") as log:
                active[run.name] = subprocess.Popen(train_command(run), stdout=log, stderr=subprocess.STDOUT, env=env)
        for name, proc in list(active.items()):
            if proc.poll() is not None:
                results[name] = proc.returncode
                echo(f"  {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} {name}")
                del active[name]
        time.sleep(0.5)
    return results


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


def submit(sweep: Sweep, script: str, runs_text: str) -> str:
    """Write the runs file and the script under the sweep root, then sbatch it; returns sbatch's output."""
    from megamoe.errors import MegamoeError

    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)
    (sweep.root / "runs.txt").write_text(runs_text)
    path = sweep.root / "sweep.sbatch"
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise MegamoeError("--slurm: sbatch not found; run on a SLURM login node, or use --dry-run") from None
    except subprocess.CalledProcessError as err:
        raise MegamoeError(f"--slurm: sbatch failed: {err.stderr.strip()}") from None
    return out.stdout.strip()
