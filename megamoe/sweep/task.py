"""What launch/sweep_array.sbatch runs in a SLURM array task: its job's runs in order, each attempt recorded.

The jobs file (<sweep root>/jobs.json, written at submission) lists, per array task, the runs of its
job: name, run dir, train.max_steps, `megamoe train` arguments, and for a branch its trunk's dir and
checkpoint step.

  python -m megamoe.sweep.task next JOBS_FILE TASK K
      prints `STATE RUN ATTEMPTS_FILE ARG...` (shell words) for run K of job TASK, nothing past its
      last run. STATE is done, resume or new; a new branch first gets its trunk's checkpoint (resume).
  python -m megamoe.sweep.task attempt ATTEMPTS_FILE RUN STATE -- COMMAND...
      runs COMMAND (srun starts this), keeps its heartbeat while it runs, appends its wall and CPU
      seconds and exit status to ATTEMPTS_FILE (attempts.py), and exits with its status (128 + N for
      signal N). SLURM signals every process of the step, so this one ignores SIGUSR1 and SIGTERM:
      COMMAND gets them too and acts on them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from megamoe.sweep.attempts import POLL_S, Tracked, attempts_file, reap, stop_with_parent
from megamoe.sweep.spec import Branch, Run, Sweep


def jobs_json(sweep: Sweep) -> str:
    """The jobs file's text: one list of runs per array task."""
    logs = sweep.root / "logs"
    return json.dumps([[_entry(run, logs) for run in job] for job in sweep.jobs], indent=1) + "\n"


def _entry(run: Run, logs: Path) -> dict:
    """What an array task needs to know of one run."""
    branch = run.branch and {"trunk": run.branch.trunk, "trunk_dir": str(run.branch.trunk_dir), "step": run.branch.step}
    return {
        "name": run.name, "run_dir": str(run.run_dir), "max_steps": run.cfg.train.max_steps, "args": run.args,
        "attempts": str(attempts_file(logs, run.name)), "branch": branch,
    }  # fmt: skip


def next_run(jobs_file: Path, task: int, k: int) -> str:
    """`STATE RUN ATTEMPTS_FILE ARG...` of run k of job `task`, '' past its last run."""
    from megamoe.sweep.state import start_state

    job = json.loads(jobs_file.read_text())[task]
    if k >= len(job):
        return ""
    run = job[k]
    branch = Branch(**{**run["branch"], "trunk_dir": Path(run["branch"]["trunk_dir"])}) if run["branch"] else None
    state = start_state(Path(run["run_dir"]), run["max_steps"], branch)
    return shlex.join([state, run["name"], run["attempts"], *run["args"]])


def attempt(path: Path, run: str, state: str, command: list[str]) -> int:
    """Run command to its end and record the attempt; returns its exit status as a shell would."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)  # a handler, not SIG_IGN: the command gets the default back
    proc = subprocess.Popen(command, preexec_fn=stop_with_parent(os.getpid()))
    tracked = Tracked(path, run, state, proc.pid)
    while (reaped := reap(proc.pid, block=False)) is None:
        tracked.beat()
        time.sleep(POLL_S)
    code, usage = reaped
    proc.returncode = code
    tracked.close(usage, code)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    """`next` or `attempt` (see the module docstring); a user error prints one line and exits 2."""
    from megamoe.errors import MegamoeError

    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["next"] and len(args) == 4:
            line = next_run(Path(args[1]), int(args[2]), int(args[3]))
            print(line)
            return 0
        if args[:1] == ["attempt"] and len(args) > 5 and args[4] == "--":
            return attempt(Path(args[1]), args[2], args[3], args[5:])
    except MegamoeError as err:
        print(f"megamoe: error: {err}", file=sys.stderr)
        return err.exit_status
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
