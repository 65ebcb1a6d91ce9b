"""A budget sweep end to end: a WSD trunk, a cooldown branch off its checkpoint, exactly a fresh short run."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import yaml

from megamoe.errors import CheckpointError
from megamoe.sweep.attempts import read_attempts
from megamoe.sweep.runner import status
from megamoe.sweep.spec import Branch, load_sweep
from megamoe.sweep.state import start_state
from megamoe.train.checkpoint import list_checkpoints, step_dir
from megamoe.train.metrics import read_metrics
from tests.distributed.parity import read_state
from tests.e2e.test_train import cli
from tests.util import TINY

SHORT, LONG = 6, 10
POINT = 3
"""The branch point of the 6-step budget: 6 - round(0.5 · 6). The trunk's own decay starts at 10 - 5 = 5."""


def overrides(data_cache) -> list[str]:
    """The tiny model under WSD (warm-up 2, half of each run decaying), a checkpoint every 2 steps, keep 1."""
    return [
        *TINY, f"data.cache_dir={data_cache}", "optim.decay_style=wsd", "optim.decay_fraction=0.5",
        "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "train.checkpoint_interval=2", "train.keep_checkpoints=1",
        "train.eval_interval=2",
    ]  # fmt: skip


def curve(run_dir, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of every logged step."""
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


@pytest.fixture(scope="module")
def swept(data_cache, tiny_data, tmp_path_factory):
    """The budget sweep [6, 10] (one seed), and a plain sweep of the same runs at 6 steps: the fresh reference."""
    root = tmp_path_factory.mktemp("budgets")
    common = {"out": str(root), "overrides": overrides(data_cache), "variants": {"dense": []}, "seeds": [1]}
    budget = root / "b.yaml"
    budget.write_text(yaml.safe_dump({"name": "b", "budgets": [SHORT, LONG], **common}))
    fresh = root / "ref.yaml"
    steps = [*overrides(data_cache), f"train.max_steps={SHORT}"]
    fresh.write_text(yaml.safe_dump({**common, "name": "ref", "overrides": steps}))
    dry = cli("sweep", str(budget), "--dry-run", cwd=root)
    for path in (budget, fresh):
        res = cli("sweep", str(path), cwd=root)
        assert res.returncode == 0, res.stderr + res.stdout
    res = cli("sweep", str(budget), "--collect", cwd=root)
    assert res.returncode == 0, res.stderr + res.stdout
    return root, load_sweep(budget), dry.stdout, res.stdout


def test_trunk_and_branch_runs(swept):
    _, sweep, dry, _ = swept
    trunk, branch = sweep.runs
    assert (trunk.name, branch.name) == ("dense-seed1-steps10", "dense-seed1-steps6")
    assert branch.branch == Branch(trunk.name, trunk.run_dir, POINT) and trunk.cfg.train.checkpoint_steps == [POINT]
    assert "(trunk; keeps step 3 for its branches)" in dry and f"(branch of {trunk.name} at step 3)" in dry
    assert [status(r) for r in sweep.runs] == ["done", "done"]
    # Step 3 is off the 2-step interval and older than keep_checkpoints=1 allows: kept because it is pinned.
    assert [p.name for p in list_checkpoints(trunk.run_dir)] == ["step_00000003", "step_00000010"]
    assert [p.name for p in list_checkpoints(branch.run_dir)] == ["step_00000006"], "its start pruned like any"


def test_branch_is_exactly_a_fresh_short_run(swept):
    """Trunk prefix + branch suffix == a fresh 6-step WSD run: every train loss, LR and eval loss, final weights.

    Exact (==, torch.equal): the same code at the same thread count on one CPU is deterministic, and
    a resume restores weights, AdamW moments, step and RNG bit for bit (tests/e2e/test_train.py).
    The check has teeth for a branch started too late: from step 4, its state would be the trunk's
    after 4 peak-LR updates, but the fresh run's 4th update (step index 3) already decays, so the
    loss it logs at step 5 (computed with the weights after 4 updates) would be the trunk's, which
    the last assertion shows differs from the fresh run's. Branching earlier than step 3 would also
    be exact (the updates before it are the same): the branch point is the latest exact one.
    """
    root, sweep, _, _ = swept
    trunk, branch = sweep.runs
    ref = root / "ref" / "dense-seed1"
    for key in ("train/loss", "train/lr", "eval/loss"):
        joined = [(s, v) for s, v in curve(trunk.run_dir, key) if s <= POINT] + curve(branch.run_dir, key)
        assert joined == curve(ref, key), key
    assert [lr for _, lr in curve(branch.run_dir, "train/lr")][-1] == pytest.approx(0.1 * trunk.cfg.optim.lr)
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in (branch.run_dir, ref)]
    assert summaries[0]["eval/loss"] == summaries[1]["eval/loss"]
    got, want = read_state(branch.run_dir, step_dir(branch.run_dir, SHORT)), read_state(ref, step_dir(ref, SHORT))
    for name, tensor in {**got.params, **got.moments}.items():
        assert torch.equal(tensor, {**want.params, **want.moments}[name]), name
    trunk_loss, ref_loss = dict(curve(trunk.run_dir)), dict(curve(ref))
    assert trunk_loss[POINT + 1] == ref_loss[POINT + 1], "after the branch point's state: still shared"
    assert trunk_loss[POINT + 2] != ref_loss[POINT + 2], "a branch from step 4 would log the trunk's loss here"


def test_attempts_and_collect_columns(swept):
    root, sweep, _, printed = swept
    trunk, branch = sweep.runs
    records = {run.name: read_attempts(root / "b" / "logs" / f"{run.name}.attempts.jsonl") for run in sweep.runs}
    assert [(a["state"], a["exit"]) for a in records[trunk.name]] == [("new", 0)]
    assert [(a["state"], a["exit"]) for a in records[branch.name]] == [("resume", 0)]
    assert all(a["cpu_s"] > 0 and a["wall_s"] > 0 for found in records.values() for a in found)
    with open(root / "b" / "results.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert (rows[trunk.name]["step"], rows[branch.name]["step"], rows[branch.name]["branch_step"]) == ("10", "6", "3")
    for run in sweep.runs:
        assert float(rows[run.name]["cpu_s"]) == records[run.name][0]["cpu_s"]
        assert float(rows[run.name]["wall_s"]) == records[run.name][0]["wall_s"]
    table = (root / "b" / "results.md").read_text()
    assert "| dense-steps6 | 1 | 6 |" in table and "| dense-steps10 | 1 | 10 |" in table
    assert "CPU seconds" in table and "over 2 recorded attempts" in printed


def test_a_branch_starts_from_a_linked_copy_or_names_the_missing_checkpoint(swept, tmp_path):
    _, sweep, _, _ = swept
    trunk, _ = sweep.runs
    assert start_state(tmp_path / "branch", 6, Branch(trunk.name, trunk.run_dir, POINT)) == "resume"
    (linked,) = list_checkpoints(tmp_path / "branch")
    source = step_dir(trunk.run_dir, POINT)
    assert sorted(p.name for p in linked.iterdir()) == sorted(p.name for p in source.iterdir())
    assert all(os.stat(p).st_ino == os.stat(source / p.name).st_ino for p in linked.iterdir()), "hard links"
    assert not [p for p in linked.parent.iterdir() if p.name.startswith(".")], "no temp folder left"
    with pytest.raises(CheckpointError, match=rf"step_00000004: the trunk {trunk.name} has no checkpoint at step 4"):
        start_state(tmp_path / "other", 7, Branch(trunk.name, trunk.run_dir, 4))
    assert list_checkpoints(tmp_path / "other") == []
