"""A sweep's archive from the files alone: what is kept, whole jobs only, and records cut short.

tests/e2e/test_sweep_reports.py regenerates a real study's tables from its archive alone."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from megamoe.errors import ConfigError
from megamoe.sweep.archive import export_finished, export_job, record_files, restorable, restore
from megamoe.sweep.attempts import attempts_file
from megamoe.sweep.spec import load_sweep
from megamoe.utils.locks import open_locked
from tests.unit.test_sweep_budgets import sweep_file


def finish(run, steps: int | None = None) -> None:
    """Give the run folder what a finished run leaves: records, a checkpoint, loggers' folders, a lock."""
    d = run.run_dir
    for rel in ("checkpoints/step_10/model.pt", "tensorboard/events", "wandb/run.log", ".megamoe.lock"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("x")
    (d / "tokenizer.json").write_text("{}")
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 5.0}) + "\n")
    (d / "analysis").mkdir(exist_ok=True)
    (d / "analysis" / "report.md").write_text("# report\n")
    (d / "summary.json").write_text(json.dumps({"step": steps or run.cfg.train.max_steps}))
    logs = run.run_dir.parent / "logs"
    logs.mkdir(exist_ok=True)
    attempts_file(logs, run.name).write_text('{"cpu_s": 1.0, "wall_s": 2.0}\n')


@pytest.fixture
def sweep(tmp_path):
    """Two jobs (seeds), each a 200-step trunk and its 100-step branch, archived in tmp_path/arch."""
    return load_sweep(sweep_file(tmp_path, budgets=[100, 200], seeds=[1, 2], archive="arch"))


def test_record_leaves_out_checkpoints_loggers_and_hidden_files(sweep):
    run = sweep.runs[0]
    finish(run)
    kept = record_files(run.run_dir)
    assert kept == [Path("metrics.jsonl"), Path("analysis/report.md"), Path("summary.json")]  # summary last


def test_only_whole_finished_jobs_are_archived_and_restored(sweep, tmp_path):
    (trunk1, branch1), (trunk2, branch2) = sweep.jobs
    for run in (trunk1, branch1, trunk2):
        finish(run)
    finish(branch2, steps=50)  # interrupted: its job is not finished
    assert export_finished(sweep) == 1
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == sorted(["logs", trunk1.name, branch1.name])
    assert not (tmp_path / "arch" / trunk1.name / "checkpoints").exists()
    for run in sweep.runs:  # the run folders are lost
        shutil.rmtree(run.run_dir)
    assert restorable(sweep) == [trunk1, branch1]
    assert restore(sweep) == [trunk1, branch1]
    assert json.loads((branch1.run_dir / "summary.json").read_text()) == {"step": 100}
    assert attempts_file(sweep.root / "logs", branch1.name).read_text() == '{"cpu_s": 1.0, "wall_s": 2.0}\n'
    assert not trunk2.run_dir.exists() and restorable(sweep) == []


def test_an_export_cut_short_is_not_a_finished_record(sweep, tmp_path):
    """Without summary.json (copied last) the archived run is not finished, so its job is not restored."""
    for run in sweep.jobs[0]:
        finish(run)
    assert export_job(sweep, sweep.jobs[0])
    (tmp_path / "arch" / sweep.jobs[0][1].name / "summary.json").unlink()
    for run in sweep.jobs[0]:
        (run.run_dir / "summary.json").unlink()
    assert restorable(sweep) == []
    assert export_job(sweep, sweep.jobs[0]) is False  # not done locally either: nothing to export


def test_without_an_archive_nothing_is_kept(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, budgets=[100, 200]))
    for run in sweep.runs:
        finish(run)
    assert sweep.archive is None and export_finished(sweep) == 0 and restore(sweep) == []


@pytest.mark.parametrize("bad", [3, "", ["a"]])
def test_archive_key_must_be_a_folder(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"s\.yaml: archive.*must be a folder path"):
        load_sweep(sweep_file(tmp_path, archive=bad))


def test_restore_waits_for_a_sweep_training_the_run(sweep):
    """A run whose lock is held (a sweep training it) is restored only after it is released, and said so."""
    for run in sweep.jobs[0]:
        finish(run)
    export_job(sweep, sweep.jobs[0])
    for run in sweep.jobs[0]:
        shutil.rmtree(run.run_dir)
    said: list[str] = []
    with open_locked(sweep.root / "logs" / f"{sweep.jobs[0][0].name}.lock", lambda *_: None):
        worker = threading.Thread(target=lambda: said.append(len(restore(sweep, echo=said.append))))
        worker.start()
        worker.join(timeout=1.5)
        assert worker.is_alive() and not sweep.jobs[0][0].run_dir.exists()
    worker.join(timeout=30)
    assert "waiting (0 s so far) to restore" in said[0] and said[-1] == 2
