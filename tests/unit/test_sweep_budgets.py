"""Budget sweeps without training: expansion into trunks and branches, errors, jobs, attempt records."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megamoe.config import load_config
from megamoe.errors import CheckpointError, ConfigError
from megamoe.sweep.attempts import Tracked, read_attempts, reap
from megamoe.sweep.spec import Branch, load_sweep
from megamoe.sweep.task import jobs_json, next_run
from megamoe.train.upcycle import warmup_steps

WSD = ["optim.decay_style=wsd", "optim.warmup_steps=10", "optim.decay_fraction=0.2"]


def sweep_file(tmp_path: Path, **spec) -> Path:
    """A sweep of the default model under WSD, written to tmp_path/s.yaml."""
    spec = {"name": "s", "out": str(tmp_path / "out"), "overrides": WSD, **spec}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_budgets_expand_into_a_trunk_and_branches_per_seed(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, budgets=[100, 200, 400], seeds=[1, 2], grid={"optim.lr": [0.001]}))
    assert len(sweep.runs) == 6 and len(sweep.jobs) == 2
    trunk, *branches = sweep.jobs[0]
    assert [r.name for r in sweep.jobs[0]] == [f"base-lr=0.001-seed1-steps{s}" for s in (400, 100, 200)]
    assert [r.group for r in sweep.jobs[0]] == [f"base-lr=0.001-steps{s}" for s in (400, 100, 200)]
    assert trunk.branch is None and trunk.cfg.train.max_steps == 400
    assert [b.branch for b in branches] == [Branch(trunk.name, trunk.run_dir, s) for s in (80, 160)]
    assert trunk.cfg.train.checkpoint_steps == [80, 160]
    assert [b.cfg.train.max_steps for b in branches] == [100, 200] and branches[0].cfg.train.checkpoint_steps == []


def test_a_user_checkpoint_step_stays_pinned_on_the_trunk(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, budgets=[100, 200], overrides=[*WSD, "train.checkpoint_steps=[50]"]))
    assert sweep.runs[0].cfg.train.checkpoint_steps == [50, 80]


def test_one_budget_is_a_plain_wsd_run(tmp_path):
    (run,) = load_sweep(sweep_file(tmp_path, budgets=[100])).runs
    assert run.name == "base-steps100" and run.branch is None and run.cfg.train.checkpoint_steps == []


def test_largest_budget_seeds_add_a_trunk_alone_per_variant_after_the_other_seeds(tmp_path):
    spec = {"budgets": [100, 200, 400], "seeds": [1, 2], "largest_budget_seeds": [3], "variants": {"a": [], "b": []}}
    sweep = load_sweep(sweep_file(tmp_path, **spec))
    assert len(sweep.runs) == 14 and [len(job) for job in sweep.jobs] == [3, 3, 3, 3, 1, 1]
    extra = [job[0] for job in sweep.jobs[4:]]
    assert [r.name for r in extra] == ["a-seed3-steps400", "b-seed3-steps400"]
    assert [r.group for r in extra] == ["a-steps400", "b-steps400"]  # reported with seeds 1 and 2 at 400 steps
    (trunk,) = [r for r in sweep.runs if r.name == "a-seed1-steps400"]
    assert (extra[0].cfg.train.seed, extra[0].cfg.train.max_steps, extra[0].branch) == (3, 400, None)
    assert extra[0].cfg.train.checkpoint_steps == [] and trunk.cfg.train.checkpoint_steps == [80, 160]
    same = {f.name for f in dataclasses.fields(trunk.cfg)} - {"train"}  # the trunk's config but its seed and pins
    assert all(getattr(extra[0].cfg, f) == getattr(trunk.cfg, f) for f in same)
    differs = {
        f.name
        for f in dataclasses.fields(trunk.cfg.train)
        if getattr(trunk.cfg.train, f.name) != getattr(extra[0].cfg.train, f.name)
    }
    assert differs == {"seed", "checkpoint_steps", "name", "run_dir"}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"budgets": 100}, r"s.yaml: budgets: must be a non-empty list of positive train.max_steps"),
        ({"budgets": [100, 0]}, r"budgets: must be a non-empty list of positive"),
        ({"budgets": [200, 100]}, r"budgets: must be ascending and distinct, got \[200, 100\]"),
        ({"budgets": [100, 100]}, r"must be ascending and distinct"),
        ({"budgets": [100, 200], "grid": {"train.max_steps": [5]}}, r"grid: train.max_steps is set by budgets"),
        (
            {"budgets": [100, 200], "overrides": ["optim.warmup_steps=10"]},
            r"budgets: run base-steps200: needs optim.decay_style=wsd .*got cosine",
        ),
        (
            {"budgets": [100, 200], "overrides": ["optim.decay_style=wsd"]},
            r"budgets: run base-steps200: needs an explicit optim.warmup_steps > 0 and < 80, .* got 0",
        ),
        (
            {"budgets": [11, 200], "overrides": WSD},
            r"s.yaml: base-steps11: optim.warmup_steps: wsd: the 10 warm-up steps end after the decay starts at step 9",
        ),
        (
            {"budgets": [12, 200], "overrides": WSD},
            r"needs an explicit optim.warmup_steps > 0 and < 10, the smallest budget's decay start .* got 10",
        ),
        (
            {"budgets": [100, 200], "overrides": [*WSD, "moe.routing=lory", "moe.segment_length=64"]},
            r"budgets: run base-steps200: Lory's dense warm-up .* differs between budgets: \{10, 5\}",
        ),
        ({"seeds": [1], "largest_budget_seeds": [2]}, r"s.yaml: largest_budget_seeds: needs budgets and seeds"),
        ({"budgets": [100], "largest_budget_seeds": [2]}, r"largest_budget_seeds: needs budgets and seeds"),
        ({"budgets": [100], "seeds": [1], "largest_budget_seeds": 2}, r"must be a non-empty list of integer seeds"),
        ({"budgets": [100], "seeds": [1], "largest_budget_seeds": [2, 1]}, r"must be distinct seeds not in seeds"),
        ({"budgets": [100], "seeds": [1], "largest_budget_seeds": [2, 2]}, r"must be distinct seeds not in seeds"),
    ],
)
def test_bad_budget_sweeps_name_the_file_and_key(tmp_path, spec, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(sweep_file(tmp_path, **spec))


def test_lory_joins_a_budget_sweep_with_a_dense_warmup_in_steps(tmp_path):
    """moe.dense_warmup_steps fixes Lory's warm-up length, so every budget shares it with the trunk."""
    lory = [*WSD, "moe.routing=lory", "moe.segment_length=64", "moe.dense_warmup_steps=5"]
    sweep = load_sweep(sweep_file(tmp_path, budgets=[100, 200], overrides=lory))
    assert {warmup_steps(run.cfg) for run in sweep.runs} == {5}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["moe.dense_warmup_steps=5"], r"moe.dense_warmup_steps: dense warm-up and upcycling are implemented for"),
        (["moe.routing=lory", "moe.dense_warmup_steps=-1"], r"moe.dense_warmup_steps: must be >= 0"),
        (["moe.routing=lory", "moe.dense_warmup_steps=300", "train.max_steps=300"], r"must be < train.max_steps"),
    ],
)
def test_bad_dense_warmup_steps(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_jobs_file_gives_each_array_task_its_runs_in_order(tmp_path):
    """`python -m megamoe.sweep.task next`: state, run, record file and arguments; a branch needs its trunk's step."""
    sweep = load_sweep(sweep_file(tmp_path, budgets=[100, 200], seeds=[1, 2]))
    jobs = tmp_path / "jobs.json"
    jobs.write_text(jobs_json(sweep))
    assert [[r["name"] for r in job] for job in json.loads(jobs.read_text())] == [
        ["base-seed1-steps200", "base-seed1-steps100"], ["base-seed2-steps200", "base-seed2-steps100"]
    ]  # fmt: skip
    state, name, attempts, *args = shlex.split(next_run(jobs, 1, 0))
    trunk = sweep.jobs[1][0]
    assert (state, name, args) == ("new", trunk.name, trunk.args)
    assert attempts == str(sweep.root / "logs" / f"{trunk.name}.attempts.jsonl")
    assert next_run(jobs, 1, 2) == ""
    with pytest.raises(CheckpointError, match=r"step_00000080: the trunk base-seed2-steps200 has no checkpoint"):
        next_run(jobs, 1, 1)


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"


def test_each_child_is_charged_its_own_cpu_time(tmp_path):
    """os.wait4 per pid: a busy and an idle child, running at once, each get their own CPU seconds."""
    busy = subprocess.Popen([sys.executable, "-S", "-c", BURN])
    idle = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(0.6)"])
    path = tmp_path / "r.attempts.jsonl"
    tracked = Tracked(path, "r", "new", busy.pid)
    deadline, done = time.monotonic() + 30, {}
    while len(done) < 2 and time.monotonic() < deadline:
        for name, proc in (("busy", busy), ("idle", idle)):
            if name not in done and (reaped := reap(proc.pid, block=False)) is not None:
                proc.returncode, done[name] = reaped[0], reaped
        time.sleep(0.05)
    (busy_code, busy_use), (idle_code, idle_use) = done["busy"], done["idle"]
    assert busy_code == idle_code == 0
    assert busy_use.ru_utime + busy_use.ru_stime >= 0.55
    assert idle_use.ru_utime + idle_use.ru_stime < 0.3
    tracked.close(busy_use, 0)
    with open(path, "a") as fh:
        fh.write('{"run": "r", "cpu')  # a kill mid-write
    (entry,) = read_attempts(path)
    assert entry["cpu_s"] >= 0.55 and (entry["exit"], entry["state"], entry["pid"]) == (0, "new", busy.pid)
    assert 0.55 <= entry["wall_s"] < 30


def test_the_attempt_wrapper_records_and_passes_the_exit_status_on(tmp_path):
    """What srun runs under SLURM: the command's status (128 + N for signal N) and one record per attempt."""
    path = tmp_path / "logs" / "r.attempts.jsonl"
    wrap = [sys.executable, "-m", "megamoe.sweep.task", "attempt", str(path), "r", "resume", "--", sys.executable]
    assert subprocess.run([*wrap, "-S", "-c", "raise SystemExit(3)"]).returncode == 3
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([*wrap, "-S", "-c", killed]).returncode == 137
    assert [(a["state"], a["exit"]) for a in read_attempts(path)] == [("resume", 3), ("resume", -9)]
