"""Running a sweep: locally (in sequence or N jobs at a time) or as a SLURM array job (one task per job).

A job is one run, or a budget sweep's trunk followed by its cooldown branches (budgets.py): its runs
go in order, so a branch finds its trunk's checkpoint. Each run is done, resumes (`--resume`) or
starts fresh (state.py); a new branch starts from its trunk's checkpoint. Each local run's output
goes to <sweep root>/logs/<run>.log, and each attempt's wall and CPU seconds to
<run>.attempts.jsonl (attempts.py). With N at a time, each process gets an equal share of the cores.

A killed sweep is rerun as it was: finished runs are skipped, interrupted ones resume. Each
running `megamoe train` holds <sweep root>/logs/<run>.lock, so a second sweep of the same file
never trains the same run twice: it goes on with the jobs nobody holds and comes back to the held
one (saying whom it waits for), so several sweeps of one file share its jobs. The run gets SIGTERM (save a
checkpoint and stop) if the sweep process dies, so no orphan trains on beside a rerun. A stop
signal to the sweep (SIGTERM, SIGINT, SIGUSR1) is passed on to its runs; it records them once they
have checkpointed and exited, and exits 128 + the signal's number. A trunk
that fails (or stops early) leaves its branches for the rerun; a failed branch does not stop its siblings.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megamoe.errors import MegamoeError
from megamoe.sweep.archive import archived, export_job_of
from megamoe.sweep.attempts import POLL_S, Tracked, attempts_file, in_flight, reap, stop_with_parent
from megamoe.sweep.spec import Run, Sweep
from megamoe.sweep.state import run_state, start_state
from megamoe.sweep.task import jobs_json
from megamoe.train.preempt import PreemptionFlag
from megamoe.utils.locks import LOCK_REMINDER_S, note_holder, try_lock

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "sweep_array.sbatch"


def status(run: Run) -> str:
    """done, resume or new."""
    return run_state(run.run_dir, run.cfg.train.max_steps)


def listed_status(sweep: Sweep, run: Run) -> str:
    """status, or 'archive' for a run not done here that the sweep's archive holds finished (restored on a run)."""
    state = status(run)
    return "archive" if state != "done" and archived(sweep, run) else state


def train_command(run: Run, state: str | None = None) -> list[str]:
    """The `megamoe train` command line of a run (with --resume when it has checkpoints)."""
    resume = ["--resume"] if (state or status(run)) == "resume" else []
    return [sys.executable, "-m", "megamoe", "train", *run.args, *resume]


def describe(sweep: Sweep) -> list[list[tuple[Run, str]]]:
    """Per job, each run and a line on it: state, name, run dir, its part in a budget sweep, an attempt in flight."""
    out = []
    for job in sweep.jobs:
        pins = [str(r.branch.step) for r in job if r.branch]
        keeps = f"  (trunk; keeps step{'s' * (len(pins) > 1)} {', '.join(pins)} for its branches)" if pins else ""
        lines = []
        for run in job:
            role = f"  (branch of {run.branch.trunk} at step {run.branch.step})" if run.branch else keeps
            beat = in_flight(attempts_file(sweep.root / "logs", run.name))
            note = f"  [{beat}]" if beat else ""
            lines.append((run, f"{listed_status(sweep, run):7s} {run.name}  {run.run_dir}{role}{note}"))
        out.append(lines)
    return out


@dataclass
class Attempt:
    """One launched `megamoe train` of a run, and the rest of its job."""

    run: Run
    state: str
    proc: subprocess.Popen
    tracked: Tracked
    """Its heartbeat and record."""
    rest: list[Run]


class _Local:
    """The processes of a local sweep: launch, reap and record them, one job's runs after another."""

    def __init__(self, sweep: Sweep, parallel: int, echo, stop: PreemptionFlag):
        self.logs, self.echo, self.stop, self.parallel = sweep.root / "logs", echo, stop, parallel
        self.env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
        self.results: dict[str, int] = {}
        self.waits: dict[str, tuple[float, float]] = {}
        """Runs another sweep holds: when this sweep first found them held, and last said so."""

    def fill(self, pending: list[list[Run]], active: list[Attempt]) -> list[list[Run]]:
        """Start pending jobs' next runs into the free slots, in order; returns the jobs still pending.

        A job whose next run another sweep is training keeps its place and is tried again on the next
        call, while the jobs after it may start: the sweep never blocks on a lock.
        """
        left = []
        for job in pending:
            if len(active) >= self.parallel or self.stop.signum is not None:
                left.append(job)
                continue
            attempt, held = self.next_of(job)
            if attempt is not None:
                active.append(attempt)
            elif held:
                left.append(held)
        return left

    def next_of(self, job: list[Run]) -> tuple[Attempt | None, list[Run]]:
        """Launch the job's next unfinished run: (its attempt, []), or (None, the job from a run another sweep holds).

        (None, []) when none is left, or a stop signal has come.
        """
        while job and self.stop.signum is None:
            run, rest = job[0], job[1:]
            try:
                attempt = self.launch(run, rest)
            except MegamoeError as err:  # a branch whose trunk lacks its checkpoint: the others go on
                self.fail(run, f"{err}")
                attempt = None
            if isinstance(attempt, str):
                self.held(run, attempt)
                return None, job
            if attempt is not None:
                return attempt, []
            job = rest
        return None, []

    def held(self, run: Run, holder: str) -> None:
        """Say at once, and every LOCK_REMINDER_S after, that another sweep holds the run and whom it waits for."""
        now = time.monotonic()
        first, said = self.waits.get(run.name, (now, -math.inf))
        if now - said >= LOCK_REMINDER_S:
            self.echo(f"  waiting ({now - first:.0f} s so far) for {run.name}: another sweep is running it ({holder})")
            said = now
        self.waits[run.name] = (first, said)

    def not_started(self, pending: list[list[Run]]) -> None:
        """On a stop: name the pending runs this sweep was waiting for."""
        for job in pending:
            if job[0].name in self.waits:
                self.echo(f"  not started: {job[0].name} (stopped while another sweep held it)")

    def launch(self, run: Run, rest: list[Run]) -> Attempt | str | None:
        """Start one run's `megamoe train` holding the run's lock.

        None if it turned out done meanwhile; the holder's note if another sweep holds the lock.
        """
        lock = try_lock(self.logs / f"{run.name}.lock")
        if isinstance(lock, str):
            return lock
        self.waits.pop(run.name, None)
        try:
            fresh = status(run)
            state = start_state(run.run_dir, run.cfg.train.max_steps, run.branch)  # again, under the lock
            if state == "done":
                self.echo(f"  skip {run.name} (finished by another sweep)")
                return None
            how = f"branch of {run.branch.trunk} at step {run.branch.step}" if fresh == "new" and run.branch else state
            self.echo(f"  start {run.name} ({how})")
            with open(self.logs / f"{run.name}.log", "a") as log:
                proc = subprocess.Popen(
                    train_command(run, state), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                    pass_fds=(lock.fileno(),), preexec_fn=stop_with_parent(os.getpid()), start_new_session=True,
                )  # fmt: skip  # its own session: a terminal's Ctrl-C reaches the sweep, which stops it cleanly
            note_holder(lock, f"megamoe train pid {proc.pid}, started by sweep pid {os.getpid()}")
            tracked = Tracked(attempts_file(self.logs, run.name), run.name, state, proc.pid)  # under the lock
            return Attempt(run, state, proc, tracked, rest)
        finally:
            lock.close()  # the child holds its inherited copy of the lock until it exits

    def finished(self, attempt: Attempt) -> bool:
        """Reap the attempt if it has exited: record its time, report it, and go on with its job."""
        reaped = reap(attempt.proc.pid, block=False)
        if reaped is None:
            attempt.tracked.beat()
            return False
        code, usage = reaped
        attempt.proc.returncode = code  # reaped here (os.wait4), so Popen must not wait for it again
        name = attempt.run.name
        attempt.tracked.close(usage, code)
        self.results[name] = code
        finished = code == 0 and status(attempt.run) == "done"
        self.echo(f"  {'done' if finished else 'stopped (resumable)' if code == 0 else f'FAILED ({code})'} {name}")
        if attempt.rest and attempt.run.branch is None and not finished:
            self.echo(f"  not started: {', '.join(r.name for r in attempt.rest)} (their trunk did not finish)")
            attempt.rest = []
        return True

    def fail(self, run: Run, why: str) -> None:
        """A run that could not start: say why, in its log too."""
        self.echo(f"  FAILED {run.name}: {why}")
        with open(self.logs / f"{run.name}.log", "a") as log:
            log.write(f"megamoe sweep: error: {why}\n")
        self.results[run.name] = 2


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""What stops a local sweep (a scheduler's stop, a terminal's Ctrl-C, SLURM's preemption notice)."""


class SweepStoppedError(MegamoeError):
    """The sweep was asked to stop (a signal); its runs checkpointed and were recorded."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


def _stop_runs(active: list[Attempt], name: str, echo) -> None:
    """Pass SIGTERM on to every run in flight (each saves a checkpoint and exits) and start none after them."""
    echo(f"  {name}: asking {len(active)} runs to checkpoint and stop; a rerun of the sweep resumes them")
    for attempt in active:
        attempt.rest = []
        with contextlib.suppress(ProcessLookupError):
            attempt.proc.send_signal(signal.SIGTERM)


def run_local(sweep: Sweep, parallel: int, echo=print) -> dict[str, int]:
    """Run every unfinished run, `parallel` jobs at a time; returns each launched run's exit status.

    A stop signal (SIGTERM, SIGINT, SIGUSR1) is passed on to the runs as SIGTERM; the sweep waits
    until each has saved its checkpoint and exited, records it, and raises SweepStoppedError.
    """
    jobs = [todo for job in sweep.jobs if (todo := [r for r in job if status(r) != "done"])]
    count = sum(map(len, jobs))
    echo(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(sweep.runs) - count} done, {count} to run")
    active: list[Attempt] = []
    with PreemptionFlag(STOP_SIGNALS) as stop:
        local = _Local(sweep, parallel, echo, stop)
        local.logs.mkdir(parents=True, exist_ok=True)
        pending, stopping = jobs, False
        while pending or active:
            if stop.signum is not None and not stopping:
                local.not_started(pending)
                _stop_runs(active, signal.Signals(stop.signum).name, echo)
                pending, stopping = [], True  # nothing more starts
            pending = local.fill(pending, active)
            for attempt in list(active):
                if local.finished(attempt):
                    active.remove(attempt)
                    following, held = local.next_of(attempt.rest)
                    if following is not None:
                        active.append(following)
                    elif held:
                        pending.insert(0, held)  # its job goes on first once the other sweep lets go
                    elif export_job_of(sweep, attempt.run):
                        echo(f"  archived the job of {attempt.run.name} in {sweep.archive}")
            time.sleep(POLL_S)
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        raise SweepStoppedError(f"sweep {sweep.name}: stopped by {name}; rerun it to resume", stop.signum)
    return local.results


def sbatch_script(sweep: Sweep, parallel: int, gpus: int, time_limit: str) -> tuple[str, str]:
    """(the array job script, the jobs file's text): one array task per job (jobs_json)."""
    fills = {
        "@@NAME@@": f"megamoe-{sweep.name}",
        "@@ARRAY@@": f"0-{len(sweep.jobs) - 1}%{parallel}",
        "@@GPUS@@": str(gpus),
        "@@TIME@@": time_limit,
        "@@LOGS@@": str(sweep.root / "logs"),
        "@@JOBS_FILE@@": str(sweep.root / "jobs.json"),
    }
    script = TEMPLATE.read_text()
    for key, value in fills.items():
        script = script.replace(key, value)
    return script, jobs_json(sweep)


def submit(sweep: Sweep, script: str, jobs_text: str, options: list[str] | None = None) -> str:
    """Write the jobs file and the script under the sweep root, then sbatch it; returns sbatch's output.

    options: sbatch command-line options; they override the script's #SBATCH lines (a CPU node:
    --gpus-per-node=0 --cpus-per-task=N).
    """
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)
    (sweep.root / "jobs.json").write_text(jobs_text)
    path = sweep.root / "sweep.sbatch"
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", *(options or []), str(path)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise MegamoeError("--slurm: sbatch not found; run on a SLURM login node, or use --dry-run") from None
    except subprocess.CalledProcessError as err:
        raise MegamoeError(f"--slurm: sbatch failed: {err.stderr.strip()}") from None
    return out.stdout.strip()
