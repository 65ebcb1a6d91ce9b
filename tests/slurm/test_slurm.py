"""Preemption under a real single-node SLURM: the notice checkpoints, requeues, and the job resumes exactly.

tools/slurm/up.sh brings up munged, slurmctld and slurmd on this machine: real daemons, real signals.
The notice is sent as SLURM sends it before the time limit (`--signal=B:USR1@300` is what
`scancel --signal=USR1 --batch JOB` does now). For launch/slurm.sbatch (2 ranks) and for one task of
a `megamoe sweep --slurm` array (3 runs of 1 rank), each test asserts: the ranks saved a checkpoint
at the step they stopped at; SLURM requeued the job (same job id, Restarts=1); the second start
resumed from that checkpoint; and the train loss at every step equals an uninterrupted
single-process run's (rel 1e-5: data-parallel ranks sum gradients in another order).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from megamoe.sweep.attempts import read_attempts
from megamoe.sweep.runner import status
from megamoe.sweep.spec import load_sweep
from megamoe.train.checkpoint import list_checkpoints
from tests.slurm.cluster import (
    REPO,
    bring_up,
    job_env,
    job_info,
    logged_steps,
    run,
    wait_until,
)
from tests.util import TINY, single_process_trainer, tiny_config

pytestmark = pytest.mark.slow

STEPS = 300
RUN = [f"train.max_steps={STEPS}", "train.eval_interval=0", "train.checkpoint_interval=0"]
"""Steps take ~15 ms: enough of them that the notice lands mid-run. No periodic checkpoint, so the
only checkpoint before the final one is the preemption's."""
NOTICE_AFTER = 5
"""Steps logged before the notice: the ranks are past start-up (a notice during DeepSpeed's op build
kills the compiler, as SLURM signals every process of the step; the job is still requeued)."""
START_S = 480
"""First steps: start-up, and on a fresh machine DeepSpeed's JIT op build (a minute; minutes under load)."""
REQUEUE_S = 120
"""From the notice to the requeue: the ranks finish one step and save (a second), then srun ends."""
FINISH_S = 480
"""From the requeue to the end. SLURM holds a requeued job (Reason=BeginTime) for its credential lifetime
plus 1 s: 11 s with tools/slurm/up.sh's cred_expire=10, 121 s by default. Not forced earlier: a job
started sooner (`scontrol update StartTime=now`) may find its credential still revoked and fail
("Killing non-startable batch JobId: Job credential revoked", seen). Then start-up again."""
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm():
    """A single-node SLURM on this machine (skipped only where it cannot run)."""
    bring_up()


@pytest.fixture(scope="module")
def reference(data_cache, tiny_data, tmp_path_factory) -> dict[int, float]:
    """Train loss by step of the uninterrupted run, in this process."""
    import torch

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside busy ranks on 2 cores, 2 OpenMP threads spin: 5x slower (measured)
    try:
        single_process_trainer(tiny_config(data_cache, run_dir, *RUN)).fit()
    finally:
        torch.set_num_threads(threads)
    return losses(run_dir)


@pytest.fixture
def jobs():
    """Job ids a test submits: all cancelled when it ends, however it ends."""
    submitted: list[str] = []
    yield submitted
    for job in submitted:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)


def losses(run_dir: Path) -> dict[int, float]:
    """Train loss by step; fails if a step was logged twice (a resume that repeated steps)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice in {run_dir}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def assert_same_losses(run_dir: Path, reference: dict[int, float]) -> None:
    """Every step 1..STEPS logged once, each loss equal to the uninterrupted run's."""
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(reference)
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"train/loss at step {step}"


def preempt(job: str, run_dir: Path, log: Path) -> None:
    """Once the run trains, send the notice; wait until SLURM requeued the job and it ended again."""

    def training() -> bool:
        return len(logged_steps(run_dir)) >= NOTICE_AFTER

    def requeued_or_ended() -> bool:
        info = job_info(job)
        return info.get("Restarts", "0") != "0" or info.get("JobState") in TERMINAL

    def ended() -> bool:
        return job_info(job).get("JobState") in TERMINAL

    wait_until(f"{run_dir.name} to log {NOTICE_AFTER} steps", training, START_S, [job], [log])
    run("scancel", "--signal=USR1", "--batch", job)
    wait_until(f"job {job} to be requeued", requeued_or_ended, REQUEUE_S, [job], [log])
    assert job_info(job)["Restarts"] == "1", f"job {job} ended without a requeue:\n{log.read_text()[-4000:]}"
    wait_until(f"requeued job {job} to finish", ended, FINISH_S, [job], [log])


def assert_preempted_and_resumed(job: str, run_dir: Path, log: Path) -> None:
    """One requeue, a checkpoint at the preemption step, the second start resumed from it, the run finished."""
    info = job_info(job)
    text = log.read_text(errors="replace")
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text[-4000:]
    stops = re.findall(r"stopped by SIGUSR1 at step (\d+)", text)
    assert len(stops) == 1, text[-4000:]
    step = int(stops[0])
    assert 0 < step < STEPS
    assert "preemption notice" in text and "requeueing (srun exited with status 0)" in text
    saved = run_dir / "checkpoints" / f"step_{step:08d}"
    assert re.search(rf"SIGUSR1: saved \S*{run_dir.name}/checkpoints/{saved.name}", text), text[-4000:]
    assert [p.name for p in list_checkpoints(run_dir)] == [saved.name, f"step_{STEPS:08d}"]
    assert json.loads((saved / "meta.json").read_text())["step"] == step
    assert re.search(rf"resumed from \S*{saved.name} \(written at \S+\) at step {step}\b", text), text[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["step"], summary["preempted"]) == (STEPS, None)


def test_sbatch_preempt_requeue_resume(slurm, data_cache, reference, tmp_path, jobs):
    """launch/slurm.sbatch, 2 ranks: notice -> checkpoint at that step -> requeue -> resume -> same losses."""
    (tmp_path / "logs").mkdir()
    cpu_node = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"]  # override the GPU-node #SBATCH lines
    args = [str(REPO / "configs/debug/cpu_tiny.yaml"), *TINY, f"data.cache_dir={data_cache}", *RUN]
    out = run("sbatch", "--parsable", *cpu_node, str(REPO / "launch/slurm.sbatch"), *args,
              env=job_env(GPUS_PER_NODE="2"), cwd=tmp_path)  # fmt: skip
    job = out.strip().split(";")[0]
    jobs.append(job)
    run_dir, log = tmp_path / "runs" / f"cpu_tiny-{job}", tmp_path / "logs" / f"megamoe-{job}.out"
    preempt(job, run_dir, log)
    assert_preempted_and_resumed(job, run_dir, log)
    assert_same_losses(run_dir, reference)


def test_sweep_array_preempt_requeue_resume(slurm, data_cache, reference, tmp_path, jobs):
    """`megamoe sweep --slurm`, 3 runs: one preempted mid-run resumes from its checkpoint; all three finish."""
    spec = {"name": "pre", "out": str(tmp_path), "seeds": [1234, 1, 2],  # 1234: the reference's seed
            "overrides": [*TINY, f"data.cache_dir={data_cache}", *RUN]}  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(spec))
    # The array script asks for GPUs and 16 CPUs per run: override both for this CPU node.
    env, cpu_node = job_env(), ["--sbatch-arg=--gpus-per-node=0", "--sbatch-arg=--cpus-per-task=1"]
    out = run(env["PYTHON"], "-m", "megamoe", "sweep", str(path), "--slurm", "--parallel", "3", "--gpus", "1",
              "--time", "30:00", *cpu_node, env=env, cwd=tmp_path)  # fmt: skip
    array = re.search(r"Submitted batch job (\d+)", out).group(1)
    jobs.append(array)
    sweep = load_sweep(path)
    first = sweep.runs[0]
    logs = [sweep.root / "logs" / f"megamoe-pre-{array}_{i}.out" for i in range(3)]
    preempt(f"{array}_0", first.run_dir, logs[0])
    tasks = [f"{array}_{i}" for i in range(3)]

    def ended() -> bool:
        return all(job_info(task).get("JobState") in TERMINAL for task in tasks)

    wait_until("every array task to finish", ended, FINISH_S, tasks, logs)
    assert_preempted_and_resumed(f"{array}_0", first.run_dir, logs[0])
    assert_same_losses(first.run_dir, reference)
    for task, log in zip(tasks[1:], logs[1:]):
        info = job_info(task)
        assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), log.read_text()[-4000:]
    assert [status(r) for r in sweep.runs] == ["done"] * 3


def test_budget_sweep_task_runs_trunk_then_branch_and_resumes_the_branch(slurm, data_cache, tmp_path, jobs):
    """A budget sweep's one array task: the trunk, then its branch; a notice in the branch requeues the task,
    which skips the finished trunk and resumes the branch. Every attempt is recorded with its CPU time."""
    steps = ["optim.decay_style=wsd", "optim.decay_fraction=0.5", *RUN[1:]]
    spec = {"name": "bud", "out": str(tmp_path), "seeds": [1], "budgets": [400, 600],
            "overrides": [*TINY, f"data.cache_dir={data_cache}", *steps]}  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(spec))
    env, cpu_node = job_env(), ["--sbatch-arg=--gpus-per-node=0", "--sbatch-arg=--cpus-per-task=1"]
    out = run(env["PYTHON"], "-m", "megamoe", "sweep", str(path), "--slurm", "--gpus", "1", "--time", "30:00",
              *cpu_node, env=env, cwd=tmp_path)  # fmt: skip
    array = re.search(r"Submitted batch job (\d+)", out).group(1)
    jobs.append(array)
    trunk, branch = load_sweep(path).runs
    log = trunk.run_dir.parent / "logs" / f"megamoe-bud-{array}_0.out"

    def branch_trains() -> bool:
        return len(logged_steps(branch.run_dir)) >= NOTICE_AFTER

    wait_until(f"{branch.name} to log {NOTICE_AFTER} steps", branch_trains, START_S + FINISH_S, [array], [log])
    run("scancel", "--signal=USR1", "--batch", f"{array}_0")
    wait_until("the task to end", lambda: job_info(f"{array}_0").get("JobState") in TERMINAL, 2 * FINISH_S,
               [array], [log])  # fmt: skip
    text = log.read_text(errors="replace")
    assert (job_info(f"{array}_0")["JobState"], job_info(f"{array}_0")["Restarts"]) == ("COMPLETED", "1"), text[-4000:]
    assert text.count(f"run {trunk.name} (new)") == 1 and text.count(f"run {branch.name} (resume)") == 2, text[-4000:]
    assert [status(r) for r in (trunk, branch)] == ["done", "done"]
    assert sorted(losses(branch.run_dir)) == list(range(201, 401)), "the branch trained from step 200, once"
    logs = trunk.run_dir.parent / "logs"
    found = {r.name: read_attempts(logs / f"{r.name}.attempts.jsonl") for r in (trunk, branch)}
    assert [(a["state"], a["exit"]) for a in found[trunk.name]] == [("new", 0)]
    assert [(a["state"], a["exit"]) for a in found[branch.name]] == [("resume", 0), ("resume", 0)]
    assert all(a["cpu_s"] > 0 for records in found.values() for a in records)


def _data_jobs() -> list[str]:
    """Ids of the sharded preparation's jobs SLURM still knows (names megamoe-data-<stage>)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=60).stdout
    rows = [line.split() for line in out.splitlines()]
    return [row[0] for row in rows if len(row) > 1 and row[1].startswith("megamoe-data-")]


def test_sharded_prepare_on_slurm_survives_a_cancel_and_equals_local_workers(slurm, tmp_path, jobs):
    """`megamoe data prepare --slurm`: the plan job submits the stage arrays; cancelling them mid-way and rerunning
    the command resubmits only unfinished shards; the cache equals a local `--workers 2` run's byte for byte."""
    from tests.faults.test_sharded_faults import completed_task_logs, done_shards
    from tests.unit.test_sharded_prepare import tree_digest

    data = [*TINY, "data.shard_documents=4", "data.order=similarity", "data.similarity.hash_features=4096",
            "logging.progress=false"]  # fmt: skip
    env = job_env()

    def prepare(cache: Path, *how: str) -> str:
        return run(env["PYTHON"], "-m", "megamoe", "data", "prepare", *data, f"data.cache_dir={cache}", *how,
                   env=env, cwd=tmp_path)  # fmt: skip

    prepare(tmp_path / "local", "--workers=2")
    (local,) = [p for p in (tmp_path / "local" / "data").iterdir() if p.is_dir() and not p.name.endswith(".work")]
    cache = tmp_path / "slurm"
    root = cache / "data" / local.name
    out = prepare(cache, "--slurm", "--time=10:00", "--mem-per-cpu-gb=1")
    jobs += re.findall(r"submitted SLURM jobs ([\d ]+)", out)[0].split()
    logs = [cache / "data" / f"{local.name}.work" / "logs"]
    again = subprocess.run([env["PYTHON"], "-m", "megamoe", "data", "prepare", *data, f"data.cache_dir={cache}",
                            "--slurm"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "is being prepared by SLURM jobs" in again.stderr, again.stderr[-2000:]
    wait_until("a token shard on SLURM", lambda: len(done_shards(cache)) >= 1, START_S, jobs, logs)
    cancelled = _data_jobs()
    jobs += cancelled
    run("scancel", *cancelled)
    wait_until("the cancelled jobs to leave", lambda: not _data_jobs(), REQUEUE_S, jobs, logs)
    assert not root.exists(), "the cancel came too late: the preparation had finished"
    before = completed_task_logs(cache)

    out = prepare(cache, "--slurm", "--time=10:00", "--mem-per-cpu-gb=1")
    jobs += re.findall(r"submitted SLURM jobs ([\d ]+)", out)[0].split()
    wait_until("the resubmitted preparation to finish", lambda: (root / "manifest.json").is_file(), FINISH_S,
               jobs, logs)  # fmt: skip
    assert tree_digest(root) == tree_digest(local)
    after = completed_task_logs(cache)
    assert {name: after[name] for name in before} == before, "a finished shard's task ran again"
    assert "already finished" in prepare(cache, "--slurm")
