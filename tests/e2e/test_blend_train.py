"""Training on a weighted blend of two sources: per-source eval, exact shares, exact resume, `megamoe eval`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megamoe.cli.eval_cmd import evaluate_run
from megamoe.data.blend_sampler import BlendIndex
from megamoe.train.metrics import read_metrics
from megamoe.train.run import load_run_config
from tests.util import blend_override, single_process_trainer, tiny_config, write_source

NAMES, WEIGHTS = ("prose", "code"), (3, 1)
GLOBAL_BATCH = 4
"""The tiny config's train.global_batch_size."""


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> tuple[Path, str]:
    """(data cache, the data.blend override) of prose (weight 3) and code (weight 1)."""
    root = tmp_path_factory.mktemp("blend_sources")
    paths = [write_source(root / f"{name}.jsonl", name) for name in NAMES]
    return root / "cache", blend_override(*zip(paths, WEIGHTS))


def train(blend: tuple[Path, str], run_dir: Path, *extra: str, resume: bool = False) -> dict:
    """The tiny config on the blend, in this process; returns the summary."""
    cache, override = blend
    return single_process_trainer(tiny_config(cache, run_dir, override, *extra), resume).fit()


@pytest.fixture(scope="module")
def straight(blend, tmp_path_factory) -> tuple[Path, dict]:
    """(run dir, summary) of 6 uninterrupted steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    return run, train(blend, run)


def test_blend_run_logs_each_source(straight):
    run, summary = straight
    records = read_metrics(run)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        losses = [r[f"eval/{name}/loss"] for name in NAMES]
        assert all(r[f"eval/{name}/ppl"] == pytest.approx(math.exp(r[f"eval/{name}/loss"])) for name in NAMES)
        assert r["eval/loss"] == pytest.approx((3 * losses[0] + 1 * losses[1]) / 4, rel=1e-12)
        assert {"eval/ppl/prose/prose", "eval/ppl/code/code"} <= r.keys()
    index = BlendIndex(list(WEIGHTS))
    shares = [(r["step"], [r[f"data/share/{name}"] for name in NAMES]) for r in records if "train/loss" in r]
    assert [s for s, _ in shares] == [1, 2, 3, 4, 5, 6]
    for step, got in shares:
        samples = step * GLOBAL_BATCH
        assert got == (index.counts(samples) / samples).tolist(), f"step {step}: shares are exact counts"
    assert summary["eval/code/loss"] == evals[-1]["eval/code/loss"]
    assert [s.label for s in load_run_config(str(run), []).data.blend] == list(NAMES)


def test_blend_resume_continues_exactly(blend, straight, tmp_path):
    """3 steps, stop, resume to 6: the same losses, shares and per-source eval as 6 straight steps."""
    run = tmp_path / "split"
    train(blend, run, "train.max_steps=3")
    single_process_trainer(load_run_config(str(run), ["train.max_steps=6"]), resume=True).fit()
    keys = ("train/loss", "data/share/prose", "eval/prose/loss", "eval/code/loss", "eval/loss")
    for key in keys:
        got = [(r["step"], r[key]) for r in read_metrics(run) if key in r]
        want = [(r["step"], r[key]) for r in read_metrics(straight[0]) if key in r]
        assert got == want, key


def test_eval_command_reports_each_source(straight):
    record = evaluate_run(straight[0], None, 0, 8)
    rows = {row["domain"]: row for row in record["domains"]}
    assert {"all", "prose", "code", "prose/prose", "code/code"} <= rows.keys()
    assert rows["prose"]["tokens"] + rows["code"]["tokens"] == rows["all"]["tokens"]
