"""A sweep's archive: the records of its finished jobs without their checkpoints, where they outlive the run folders.

A sweep file's `archive: DIR` (relative to the sweep file) names it. It is small enough to commit
with the study (configs/sweeps/crossover.yaml keeps docs/records/crossover), so `--collect`
regenerates a study's tables and plots on a machine that never trained it, and a long sweep whose
run folders are lost (a scratch purge, a new checkout) keeps every job it finished.
- Export: once every run of a job (a run, or a trunk and its branches) is done, each run's files
  but its checkpoints go to DIR/<run>/ and its attempts record to DIR/logs/. The local sweep does
  it as each job ends; `--collect` does it for every finished job after its reports ran, so the
  records they cache in the run folders (analysis/, eval/) are kept too.
- Restore: before a sweep runs or collects, each job that is not done locally but finished in the
  archive is copied back into its run folders. Its runs then count as done and are not trained
  again; their checkpoints are gone, so only records the archive holds can be read from them.
Every file is copied to a temp file and renamed, and a run's summary.json goes last: an export or
restore cut short leaves a record that does not count as finished, and the next one completes it.
"""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

from megamoe.sweep.attempts import attempts_file, heartbeat_file, settle
from megamoe.sweep.spec import Run, Sweep
from megamoe.utils.fs import atomic_copy_file
from megamoe.utils.locks import open_locked

SKIP = frozenset({"checkpoints", "wandb", "tensorboard", "tokenizer.json"})
"""Run-folder entries an archive leaves out: the weights, the loggers' own copies, the tokenizer."""
SUMMARY = "summary.json"


def is_done(run_dir: Path, max_steps: int) -> bool:
    """The run's summary reports max_steps (or more)."""
    summary = run_dir / SUMMARY
    return summary.is_file() and json.loads(summary.read_text()).get("step", -1) >= max_steps


def record_files(run_dir: Path) -> list[Path]:
    """The run's files an archive keeps, relative to run_dir, summary.json last."""
    found = []
    for root, dirs, names in os.walk(run_dir):
        rel = Path(root).relative_to(run_dir)
        skip = SKIP if rel == Path(".") else frozenset()
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
        found += [rel / n for n in sorted(names) if not n.startswith(".") and n not in skip]
    found.sort(key=lambda p: p == Path(SUMMARY))
    return found


def copy_file(src: Path, dst: Path) -> bool:
    """Copy src to dst through a synced temp file and a rename, unless dst already holds the same bytes."""
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return False
    atomic_copy_file(src, dst)
    return True


def copy_record(src_dir: Path, dst_dir: Path) -> int:
    """Copy a run's record (record_files) from src_dir to dst_dir; returns the files written."""
    return sum(copy_file(src_dir / rel, dst_dir / rel) for rel in record_files(src_dir))


def _job_of(sweep: Sweep, run: Run) -> tuple[Run, ...]:
    """The job (a run, or a trunk with its branches) that run belongs to."""
    return next(job for job in sweep.jobs if run in job)


def export_job(sweep: Sweep, job: tuple[Run, ...]) -> bool:
    """Archive the job if the sweep has an archive and every run of the job is done; True if it was."""
    if sweep.archive is None or not all(is_done(r.run_dir, r.cfg.train.max_steps) for r in job):
        return False
    for run in job:
        attempts = attempts_file(sweep.root / "logs", run.name)
        settle(attempts)  # a finished attempt a killed sweep never reaped counts, from its heartbeat
        if attempts.is_file():
            copy_file(attempts, attempts_file(sweep.archive / "logs", run.name))
        copy_record(run.run_dir, sweep.archive / run.name)
    return True


def export_job_of(sweep: Sweep, run: Run) -> bool:
    """export_job of the run's job."""
    return export_job(sweep, _job_of(sweep, run))


def export_finished(sweep: Sweep) -> int:
    """Archive every finished job; returns how many."""
    return sum(export_job(sweep, job) for job in sweep.jobs)


def archived(sweep: Sweep, run: Run) -> bool:
    """The archive holds the run, finished."""
    return sweep.archive is not None and is_done(sweep.archive / run.name, run.cfg.train.max_steps)


def restorable(sweep: Sweep) -> list[Run]:
    """The runs not done locally of the jobs the archive holds whole."""
    out = []
    for job in sweep.jobs:
        if all(archived(sweep, r) for r in job):
            out += [r for r in job if not is_done(r.run_dir, r.cfg.train.max_steps)]
    return out


def restore(sweep: Sweep, echo=print) -> list[Run]:
    """Copy each restorable run's record and attempts back from the archive; returns the runs restored.

    Each run is restored holding its lock (logs/<run>.lock), as a sweep holds it to train the run: a
    sweep training it now is waited for (and said so), then the run is skipped if it finished."""
    restored, logs = [], sweep.root / "logs"
    for run in restorable(sweep):

        def waiting(seconds: float, holder: str, run: Run = run) -> None:
            echo(f"  waiting ({seconds:.0f} s so far) to restore {run.name}: a sweep is running it ({holder})")

        with open_locked(logs / f"{run.name}.lock", waiting):
            if is_done(run.run_dir, run.cfg.train.max_steps):
                continue
            attempts = attempts_file(sweep.archive / "logs", run.name)
            if attempts.is_file():  # the attempts that made the result replace any of a local partial run
                copy_file(attempts, attempts_file(logs, run.name))
                heartbeat_file(attempts_file(logs, run.name)).unlink(missing_ok=True)
            copy_record(sweep.archive / run.name, run.run_dir)
            restored.append(run)
    return restored
