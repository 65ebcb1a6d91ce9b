"""Sharded `megamoe data prepare --workers N` under kill -9: the rerun redoes only unfinished shards.

Real processes: the prepare's whole process group (the datatrove worker pool included) is SIGKILLed
once some token shards are written and others are not; the rerun — the same command line, with
another worker count — finishes it. The cache must equal an uninterrupted run's byte for byte, no
temp folder may remain, and the shard tasks that had finished before the kill must not run again
(datatrove writes each task's log when the task runs: those logs keep their modification times).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.procs import kill_when, launch, megamoe, run, settled, tail
from tests.faults.test_data_faults import DATA, SIMILAR, temps
from tests.unit.test_sharded_prepare import tree_digest as digest

pytestmark = pytest.mark.slow

SHARDED = ["data.max_documents=240", "data.shard_documents=8", *SIMILAR]
"""240 embedded modules (~1.2M tokens), 8 per shard: 30 token tasks (27 train, 3 validation) that take
seconds, long enough to land a kill between shards. DATA's max_documents=60 is overridden (later keys win)."""


def prepare(cache: Path, workers: int) -> list[str]:
    """The sharded prepare command line."""
    return megamoe("data", "prepare", *DATA, *SHARDED, f"data.cache_dir={cache}", f"--workers={workers}")


def finished(cache: Path) -> dict[str, Path]:
    """key → folder of every finished cache under cache/data (not the work folders, which keep their logs)."""
    data = cache / "data"
    found = [p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")] if data.is_dir() else []
    return {p.name: p for p in found if not p.name.endswith(".work")}


def work_dir(cache: Path) -> Path | None:
    """The (only) sharded work folder under cache/data."""
    found = sorted((cache / "data").glob("*.work")) if (cache / "data").is_dir() else []
    return found[0] if found else None


def done_shards(cache: Path) -> list[str]:
    """Token shards written so far (finished folders, not temps)."""
    work = work_dir(cache)
    folder = work / "tokens" if work else None
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder and folder.is_dir() else []


def completed_task_logs(cache: Path) -> dict[str, int]:
    """datatrove's log file of every token task marked complete → its modification time (ns)."""
    logs = work_dir(cache) / "logs" / "tokens"
    ranks = [int(p.name) for p in (logs / "completions").iterdir()] if (logs / "completions").is_dir() else []
    return {f"task_{r:05d}.log": (logs / "logs" / f"task_{r:05d}.log").stat().st_mtime_ns for r in ranks}


def test_kill9_mid_shards_then_rerun_with_other_workers_redoes_only_the_rest(tmp_path):
    ref_cache, cache, log = tmp_path / "ref", tmp_path / "cache", tmp_path / "prepare.log"
    assert run(prepare(ref_cache, 2), log, timeout=600) == 0, tail(log)
    ((ref_key, ref_root),) = finished(ref_cache).items()
    reference = digest(ref_root)
    shards = json.loads((ref_root / "manifest.json").read_text())["shards"]
    assert (shards["train"], shards["val"]) == (27, 3)  # 216 training and 24 validation documents, 8 per shard

    proc = launch(prepare(cache, 2), log)
    assert kill_when(proc, lambda: 3 <= len(done_shards(cache)) <= 20, timeout=300), (
        f"the prepare ended before 3 of its shards were written:\n{tail(log)}"
    )
    proc.wait()
    assert settled(proc), "a process of the killed prepare survived"
    assert ref_key not in finished(cache)
    before = completed_task_logs(cache)
    assert before, "no token task had finished at the kill"

    assert run(prepare(cache, 1), log, timeout=600) == 0, tail(log)
    assert digest(finished(cache)[ref_key]) == reference, "the rerun built a different cache"
    assert [t for t in temps(cache) if not t.endswith(".lock")] == []
    assert not list(work_dir(cache).rglob(".*.tmp-*")), "a killed task's temp folder was left"
    after = completed_task_logs(cache)
    assert {name: after[name] for name in before} == before, "a finished shard's task ran again"
    assert len(after) == 30 > len(before)  # every token task done, each once
