"""The sharded preparation as datatrove stages: run on local workers, or submitted as SLURM array jobs.

Stages (tasks): plan (1) → tokens (one per token shard) → [similarity: index (1) → search (one per
training shard) → order (1)] → pack (one per output shard) → finish (1). Task counts follow from the
plan, so the plan runs first: locally in this process's executor, on SLURM as a one-task job that
submits the rest (each stage an array job that starts when the previous one succeeded).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field

from megamoe.config import DataConfig
from megamoe.data.sharded.finish import run_finish
from megamoe.data.sharded.knn import run_index, run_search
from megamoe.data.sharded.layout import Layout, num_shards, read_json
from megamoe.data.sharded.order import run_order
from megamoe.data.sharded.pack import run_pack
from megamoe.data.sharded.plan import run_plan
from megamoe.data.sharded.tokens import run_tokens, token_shards
from megamoe.errors import DataError
from megamoe.utils.fs import atomic_write_json


@dataclass
class SlurmOptions:
    """How the SLURM array jobs are requested (`megamoe data prepare --slurm`)."""

    partition: str = ""
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    max_parallel: int = -1
    """Array tasks running at once (-1: as many as SLURM allows)."""
    sbatch_args: dict[str, str] = field(default_factory=dict)


@dataclass
class StageStep:
    """One stage as a datatrove pipeline step: task `rank` does its shard of the stage."""

    cfg: DataConfig
    layout: Layout
    key: str
    stage: str
    slurm: SlurmOptions | None = None
    """plan on SLURM: submit the later stages when the plan is written."""

    def __repr__(self) -> str:
        return f"megamoe data stage {self.stage!r} of {self.layout.root}"

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        """Run this task (its output is reused when already there)."""
        cfg, layout = self.cfg, self.layout
        if self.stage == "plan":
            run_plan(cfg, layout)
            if self.slurm is not None:
                submit_later_stages(cfg, layout, self.key, self.slurm)
        elif self.stage in ("tokens", "pack"):
            split, shard = token_shards(plan_counts(layout), cfg.shard_documents)[rank]
            (run_tokens if self.stage == "tokens" else run_pack)(cfg, layout, split, shard)
        elif self.stage == "index":
            run_index(cfg, layout)
        elif self.stage == "search":
            run_search(cfg, layout, rank)
        elif self.stage == "order":
            run_order(cfg, layout)
        else:
            run_finish(cfg, layout, self.key)
        return data


def plan_counts(layout: Layout) -> dict[str, int]:
    """Documents per split, from the plan."""
    return read_json(layout.plan / "plan.json")["splits"]


def later_stages(cfg: DataConfig, layout: Layout) -> list[tuple[str, int]]:
    """(stage, tasks) of every stage after the plan."""
    counts, size = plan_counts(layout), cfg.shard_documents
    shards = len(token_shards(counts, size))
    stages = [("tokens", shards)]
    if cfg.order == "similarity":
        stages += [("index", 1), ("search", num_shards(counts["train"], size)), ("order", 1)]
    return [*stages, ("pack", shards), ("finish", 1)]


def _forget_stale_completions(layout: Layout) -> None:
    """datatrove's completion markers of an earlier preparation whose intermediates are gone."""
    if not layout.plan.exists():
        shutil.rmtree(layout.work / "logs", ignore_errors=True)


def _executor(cfg: DataConfig, layout: Layout, key: str, stage: str, tasks: int, rank: int | None = None):
    """datatrove's local executor of one stage: every task in sequence, or only task `rank`."""
    from datatrove.executor import LocalPipelineExecutor

    one = {} if rank is None else {"local_tasks": 1, "local_rank_offset": rank}
    return LocalPipelineExecutor(
        [StageStep(cfg, layout, key, stage)], tasks=tasks, workers=1, logging_dir=str(layout.logs(stage)), **one
    )


def _run_task(cfg: DataConfig, layout: Layout, key: str, stage: str, tasks: int, rank: int) -> None:
    """One task of a stage, in a worker process (skipped when datatrove marked it complete)."""
    # _run_for_rank, not run(): run() starts a multiprocess.Manager server per call, which a killed worker
    # leaves behind; _run_for_rank is what run() calls per task (datatrove 0.10, pinned in setup.py).
    _executor(cfg, layout, key, stage, tasks, rank)._run_for_rank(rank)


def _run_parallel(cfg: DataConfig, layout: Layout, key: str, stage: str, tasks: int, workers: int) -> None:
    """A stage's tasks on `workers` processes; a worker that dies (kill -9, out of memory) is one clear error."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("forkserver")  # no fork of a process that runs tokenizer/faiss threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_run_task, cfg, layout, key, stage, tasks, rank) for rank in range(tasks)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            pool.shutdown(cancel_futures=True)
            if isinstance(failed[0].exception(), BrokenProcessPool):
                raise DataError(
                    f"data: a worker of stage '{stage}' died (killed, or out of memory?); rerun the same command: "
                    f"finished shards are kept (logs: {layout.logs(stage)})"
                ) from None
            raise failed[0].exception()


def run_local(cfg: DataConfig, layout: Layout, key: str, workers: int) -> None:
    """Every stage on this machine, up to `workers` tasks at a time.

    Each task runs through datatrove's executor (its logs, stats and completion markers, as on SLURM).
    Several workers are a concurrent.futures process pool rather than datatrove's own pool: a
    multiprocess.Pool whose worker is SIGKILLed waits forever for that task (measured here), while
    this pool reports the dead worker at once.
    """
    _forget_stale_completions(layout)
    _executor(cfg, layout, key, "plan", 1).run()
    for stage, tasks in later_stages(cfg, layout):
        if workers == 1 or tasks == 1:
            _executor(cfg, layout, key, stage, tasks).run()
        else:
            _run_parallel(cfg, layout, key, stage, tasks, min(workers, tasks))


def default_partition() -> str:
    """The cluster's default partition (sinfo marks it with '*')."""
    import subprocess

    from megamoe.errors import MegamoeError

    try:
        names = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MegamoeError(f"--slurm: sinfo failed ({err}); pass --partition") from None
    default = [n[:-1] for n in names if n.endswith("*")]
    if not default:
        raise MegamoeError(f"--slurm: the cluster names no default partition (sinfo: {names}); pass --partition")
    return default[0]


def _slurm_executor(cfg, layout, key, stage, tasks, opts: SlurmOptions, depends=None, slurm_next=None):
    """A SlurmPipelineExecutor of one stage, run by this Python environment."""
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        [StageStep(cfg, layout, key, stage, slurm_next)],
        tasks=tasks,
        time=opts.time,
        partition=opts.partition or default_partition(),
        cpus_per_task=opts.cpus_per_task,
        mem_per_cpu_gb=opts.mem_per_cpu_gb,
        workers=opts.max_parallel,
        job_name=f"megamoe-data-{stage}",
        qos="",
        env_command=f"export PATH={os.path.dirname(sys.executable)}:$PATH",
        sbatch_args=dict(opts.sbatch_args),
        logging_dir=str(layout.logs(stage)),
        depends=depends,
    )


JOBS_FILE = "slurm_jobs.json"
"""In the work folder: every job id submitted for this preparation."""


def _record_jobs(layout: Layout, ids: list[str]) -> None:
    """Add job ids to the work folder's list."""
    path = layout.work / JOBS_FILE
    known = json.loads(path.read_text()) if path.is_file() else []
    atomic_write_json(path, [*known, *ids])


def live_jobs(layout: Layout) -> list[str]:
    """This preparation's jobs that SLURM still has pending or running."""
    path = layout.work / JOBS_FILE
    if not path.is_file():
        return []
    import subprocess

    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []  # no SLURM client here: nothing of ours can be running on this machine's view
    queued = {line.split("_")[0] for line in out.split()}
    return [job for job in json.loads(path.read_text()) if job in queued]


def submit_later_stages(cfg: DataConfig, layout: Layout, key: str, opts: SlurmOptions) -> list[str]:
    """Submit every stage after the plan as chained array jobs; returns their job ids (done stages: none)."""
    for name in [n for n in os.environ if n.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        del os.environ[name]  # inside the plan's job: the next jobs must not inherit its settings
    previous, executors = None, []
    for stage, tasks in later_stages(cfg, layout):
        previous = _slurm_executor(cfg, layout, key, stage, tasks, opts, depends=previous)
        executors.append(previous)
    previous.launch_job()
    ids = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
    _record_jobs(layout, ids)
    return ids


def submit_slurm(cfg: DataConfig, layout: Layout, key: str, opts: SlurmOptions) -> list[str]:
    """Submit the preparation to SLURM; returns the job ids submitted now."""
    _forget_stale_completions(layout)
    if layout.plan.exists():
        return submit_later_stages(cfg, layout, key, opts)
    executor = _slurm_executor(cfg, layout, key, "plan", 1, opts, slurm_next=opts)
    executor.launch_job()
    _record_jobs(layout, [str(executor.job_id)])
    return [str(executor.job_id)]
