"""`megamoe sweep SWEEP.yaml --parallel 1` under kill -9 at seeded moments, rerun each time as it was.

The rerun skips finished runs and resumes interrupted ones from their checkpoints; at the end,
`--collect` gives the same final losses as an uninterrupted sweep, and every run's logged
training curve is the uninterrupted one (no step logged twice, none missing).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from megamoe.sweep.attempts import HEARTBEAT_S, read_attempts
from tests.faults.procs import (
    all_gone,
    descendants,
    finish,
    kill_when,
    launch,
    megamoe,
    poll_until,
    run,
    settled,
    signal_group,
    tail,
)
from tests.util import TINY

RUNS = ("dense-seed1", "dense-seed2")
STEPS = 6
"""Steps of each run: a checkpoint and an evaluation every 2."""


def write_sweep(path: Path, out: Path, data_cache: Path, steps: int = STEPS) -> Path:
    """Two tiny runs (seeds 1, 2) of `steps` steps, a checkpoint and an evaluation every 2."""
    overrides = [
        *TINY, f"data.cache_dir={data_cache}", f"train.max_steps={steps}", "train.checkpoint_interval=2",
        "train.eval_interval=2", "optim.warmup_steps=1",
    ]  # fmt: skip
    spec = {"name": "s", "out": str(out), "overrides": overrides, "variants": {"dense": []}, "seeds": [1, 2]}
    path.write_text(yaml.safe_dump(spec))
    return path


def results(root: Path) -> dict[str, dict]:
    """results.csv of a collected sweep: run → row."""
    with open(root / "s" / "results.csv") as fh:
        return {row["run"]: row for row in csv.DictReader(fh)}


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train loss) of every logged step, in file order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]


def check_after_kill(root: Path) -> None:
    """What a kill may leave: complete checkpoints only under step_N names, and readable summaries."""
    for name in RUNS:
        run_dir = root / "s" / name
        for ckpt in (run_dir / "checkpoints").glob("step_*") if (run_dir / "checkpoints").is_dir() else []:
            assert (ckpt / "meta.json").is_file() or ckpt.name.endswith(".invalid"), f"{ckpt} is half-written"
        if (run_dir / "summary.json").exists():
            json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_kill9_during_sweep_then_rerun_resumes_and_collects_the_same(data_cache, tiny_data, tmp_path):
    """Four SIGKILLs to the sweep's process group, each during a rerun of the one before; then a last rerun.

    Each kill comes a seeded random delay after a (seeded) point of progress of its attempt
    (start-up takes most of a tiny run's time, so plain offsets would all land there): after run 1
    logs step 1 (before its first checkpoint), after it logs step k (training, checkpointing),
    after the start of run 2 (the switch, start-up), after run 2 logs step k'. Then the last run's
    summary.json is removed, the state a kill between its last checkpoint and its summary leaves
    (too short a window to hit by polling), and the sweep is rerun once more.
    """
    ref_root, root, log = tmp_path / "ref", tmp_path / "killed", tmp_path / "sweep.log"
    ref = write_sweep(tmp_path / "ref.yaml", ref_root, data_cache)
    assert run(megamoe("sweep", str(ref), "--parallel", "1"), log, timeout=600) == 0, tail(log)
    assert run(megamoe("sweep", str(ref), "--collect"), log) == 0, tail(log)
    sweep = megamoe("sweep", str(write_sweep(tmp_path / "s.yaml", root, data_cache)), "--parallel", "1")
    run1, run2 = (root / "s" / name for name in RUNS)
    rng = random.Random(5)
    k1, k2 = rng.randint(2, STEPS - 1), rng.randint(1, STEPS - 1)
    anchors = [  # (condition on the attempt's progress, seeded delay after it first holds)
        (lambda seen: _logged_step(run1) >= 1, rng.uniform(0, 0.05)),  # mostly before its first checkpoint
        (lambda seen: _logged_step(run1) >= k1, rng.uniform(0, 0.1)),
        (lambda seen: f"start {RUNS[1]}" in _text(log)[seen:], rng.uniform(0, 3.0)),
        (lambda seen: _logged_step(run2) >= k2, rng.uniform(0, 0.1)),
    ]
    hits = []
    for anchor, delay in anchors:
        before, seen = {name: _state(root / "s" / name) for name in RUNS}, len(_text(log))
        proc = launch(sweep, log)
        killed = kill_when(proc, _after(lambda a=anchor, s=seen: a(s), delay), 600)
        proc.wait()
        assert settled(proc), "a training run outlived the killed sweep"
        _check_skips_and_resumes(log, seen, before)
        check_after_kill(root)
        hits.append((round(delay, 2) if killed else "finished first", {n: _state(root / "s" / n) for n in RUNS}))
    assert sum(delay != "finished first" for delay, _ in hits) >= 3, hits
    for lose_summary in (False, True):  # the last rerun; then one after run 2 lost its summary
        if lose_summary:
            (run2 / "summary.json").unlink()
        before, seen = {name: _state(root / "s" / name) for name in RUNS}, len(_text(log))
        assert run(sweep, log, timeout=600) == 0, tail(log)
        _check_skips_and_resumes(log, seen, before)
    assert before == {RUNS[0]: "done", RUNS[1]: "resume"}
    assert {name: _state(root / "s" / name) for name in RUNS} == dict.fromkeys(RUNS, "done")
    assert run(megamoe("sweep", str(tmp_path / "s.yaml"), "--collect"), log) == 0, tail(log)
    print("kills (delay after the anchor, states after):", hits)
    got, want = results(root), results(ref_root)
    assert sorted(got) == sorted(want) == sorted(RUNS)
    for name in RUNS:
        assert (got[name]["step"], got[name]["eval_loss"]) == (want[name]["step"], want[name]["eval_loss"]), name
        assert curve(root / "s" / name) == curve(ref_root / "s" / name), f"{name}: the logged curve differs"


def _logged_step(run_dir: Path) -> int:
    """The last step a run has logged (0 before any)."""
    steps = [0]
    for line in _text(run_dir / "metrics.jsonl").splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return max(steps)


def _after(anchor, delay: float):
    """A kill_when condition: `delay` seconds after anchor() first held."""
    since: list[float] = []

    def ready() -> bool:
        if not since and anchor():
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] >= delay

    return ready


def _state(run_dir: Path, steps: int = STEPS) -> str:
    """done / resume / new, as the sweep will see it (from the files alone)."""
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("step", -1) >= steps:
        return "done"
    return "resume" if list((run_dir / "checkpoints").glob("step_*/meta.json")) else "new"


def _check_skips_and_resumes(log: Path, seen: int, before: dict[str, str]) -> None:
    """What the last sweep printed (after character `seen` of its log): finished runs skipped, others resumed."""
    out = _text(log)[seen:]
    if "sweep s: " not in out:
        return  # killed before it said anything
    out = out.split("sweep s: ", 1)[1]
    done = sum(state == "done" for state in before.values())
    assert out.startswith(f"2 runs, {done} done, {2 - done} to run"), out[:200]
    for name, state in before.items():
        if state == "done":
            assert f"start {name}" not in out, f"{name} was finished but started again"
        elif f"start {name}" in out:
            assert f"start {name} ({state})" in out, out[:400]


@pytest.mark.slow
def test_a_killed_sweep_process_takes_its_training_run_with_it(data_cache, tiny_data, tmp_path):
    """SIGKILL to the sweep process alone (not its group): its `megamoe train` saves a checkpoint and stops.

    Before, the run trained on to its end as an orphan, beside any rerun of the sweep.
    """
    root, log = tmp_path / "out", tmp_path / "sweep.log"
    sweep = megamoe("sweep", str(write_sweep(tmp_path / "s.yaml", root, data_cache, steps=1000)), "--parallel", "1")
    proc = launch(sweep, log)
    run_dir = root / "s" / RUNS[0]
    assert poll_until(lambda: "step 3/1000" in _text(root / "s" / "logs" / f"{RUNS[0]}.log"), 300), tail(log)
    (train,) = descendants(proc)
    proc.send_signal(signal.SIGKILL)  # the sweep process only; its training child is left to its own devices
    proc.wait()
    assert all_gone([train], 60), "the training run trained on as an orphan after its sweep was killed"
    assert settled(proc)
    assert _state(run_dir, steps=1000) == "resume", "the stopped run saved no checkpoint"
    assert "SIGTERM" in _text(root / "s" / "logs" / f"{RUNS[0]}.log")


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def hold_run_locks(root: Path, names: tuple[str, ...], stack: contextlib.ExitStack) -> None:
    """Hold the named runs' locks as another sweep's training processes would, with their holder notes."""
    logs = root / "s" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        held = stack.enter_context(open(logs / f"{name}.lock", "a+"))  # noqa: SIM115 - closed by the stack
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"megamoe train pid {4242 + index}, started by sweep pid 4241\n")
        held.flush()


@pytest.mark.slow
def test_a_second_sweep_goes_on_with_the_free_runs_and_comes_back_to_the_held_one(data_cache, tiny_data, tmp_path):
    """A run another sweep is training is not started twice, the wait is announced, and it holds up nothing.

    Before, the sweep blocked on the held run's lock: it started no other job, and reaped and
    heartbeat none of its own runs, until the other sweep's run ended.
    """
    root, log = tmp_path / "out", tmp_path / "sweep.log"
    sweep = megamoe("sweep", str(write_sweep(tmp_path / "s.yaml", root, data_cache)), "--parallel", "1")
    with contextlib.ExitStack() as held:
        hold_run_locks(root, RUNS[:1], held)
        proc = launch(sweep, log)
        assert poll_until(lambda: f"start {RUNS[1]} (new)" in tail(log), 120), tail(log)
        assert f"for {RUNS[0]}: another sweep is running it (megamoe train pid 4242, started by" in tail(log)
        assert tail(log).index(f"for {RUNS[0]}: another sweep") < tail(log).index(f"start {RUNS[1]}")
        assert f"start {RUNS[0]}" not in tail(log)
    assert proc.wait(300) == 0, tail(log)
    assert f"start {RUNS[0]} (new)" in tail(log) and _state(root / "s" / RUNS[0], steps=STEPS) == "done"


@pytest.mark.slow
def test_two_sweeps_of_one_file_share_its_runs_and_train_each_once(data_cache, tiny_data, tmp_path):
    """Two sweeps of the same file started together: both finish, and every run was trained by exactly one."""
    root = tmp_path / "out"
    spec = write_sweep(tmp_path / "s.yaml", root, data_cache)
    logs = [tmp_path / f"sweep{i}.log" for i in (1, 2)]
    procs = [launch(megamoe("sweep", str(spec), "--parallel", "1"), log) for log in logs]
    assert [finish(proc, 600, log) for proc, log in zip(procs, logs, strict=True)] == [0, 0], tail(logs[0])
    for name in RUNS:
        starts = [tail(log).count(f"start {name} ") for log in logs]
        assert sorted(starts) == [0, 1], (name, starts)
        (attempt,) = read_attempts(root / "s" / "logs" / f"{name}.attempts.jsonl")
        assert (attempt["state"], attempt["exit"]) == ("new", 0)
        assert _state(root / "s" / name) == "done"


@pytest.mark.slow
def test_a_sweep_killed_beside_another_leaves_its_run_to_the_other(data_cache, tiny_data, tmp_path):
    """kill -9 to one of two sweeps of one file, with its run: the other resumes that run and records the lost attempt.

    The kernel frees the killed run's lock with its process; the other sweep, which found the run
    held, then starts it from its checkpoint and settles the killed attempt's heartbeat into the
    record ahead of its own. The killed sweep's training process is stopped (SIGSTOP) once it has a
    checkpoint, so it cannot finish before the kill. The run's final loss and logged curve are an
    uninterrupted sweep's.
    """
    ref_root, root, ref_log = tmp_path / "ref", tmp_path / "out", tmp_path / "ref.log"
    assert run(megamoe("sweep", str(write_sweep(tmp_path / "r.yaml", ref_root, data_cache, 12))), ref_log, 600) == 0
    sweep = megamoe("sweep", str(write_sweep(tmp_path / "s.yaml", root, data_cache, 12)), "--parallel", "1")
    logs, run_dir = [tmp_path / f"sweep{i}.log" for i in (1, 2)], root / "s" / RUNS[0]
    first = launch(sweep, logs[0])
    assert poll_until(lambda: _state(run_dir, steps=12) == "resume", 300), tail(logs[0])
    (train,) = [p for p in descendants(first) if "train" in p.cmdline()]
    train.send_signal(signal.SIGSTOP)
    second = launch(sweep, logs[1])
    assert poll_until(lambda: f"for {RUNS[0]}: another sweep is running it" in tail(logs[1]), 120), tail(logs[1])
    assert poll_until(lambda: (root / "s" / "logs" / f"{RUNS[0]}.inflight.json").is_file(), HEARTBEAT_S + 30)
    signal_group(first, signal.SIGKILL)
    first.wait()
    assert settled(first), "a process of the killed sweep lived on"
    assert finish(second, 600, logs[1]) == 0, tail(logs[1])
    assert f"start {RUNS[0]} (resume)" in tail(logs[1]) and f"start {RUNS[1]} (new)" in tail(logs[1])
    found = read_attempts(root / "s" / "logs" / f"{RUNS[0]}.attempts.jsonl")
    assert [(a["pid"], a["exit"], a.get("lost", False)) for a in found][:1] == [(train.pid, None, True)], found
    assert [(a["state"], a["exit"]) for a in found[1:]] == [("resume", 0)], found
    assert run(megamoe("sweep", str(tmp_path / "s.yaml"), "--collect"), logs[1]) == 0, tail(logs[1])
    assert run(megamoe("sweep", str(tmp_path / "r.yaml"), "--collect"), ref_log) == 0, tail(ref_log)
    got, want = results(root), results(ref_root)
    for name in RUNS:
        assert (got[name]["step"], got[name]["eval_loss"]) == (want[name]["step"], want[name]["eval_loss"]), name
        assert curve(root / "s" / name) == curve(ref_root / "s" / name), f"{name}: the logged curve differs"


@pytest.mark.slow
def test_a_stop_signal_ends_the_wait_for_held_runs_at_once(data_cache, tiny_data, tmp_path):
    """SIGTERM to a sweep whose every run another sweep holds: it exits 143 at once, starting nothing.

    Before, the sweep waited in the first run's lock and noticed the signal only once the other
    sweep's run ended (hours, for a study's run). 20 s is far below the 60 s between the wait's
    reminders, and far above the 0.5 s between the sweep's polls.
    """
    root, log = tmp_path / "out", tmp_path / "sweep.log"
    sweep = megamoe("sweep", str(write_sweep(tmp_path / "s.yaml", root, data_cache)), "--parallel", "1")
    with contextlib.ExitStack() as held:
        hold_run_locks(root, RUNS, held)
        proc = launch(sweep, log)
        assert poll_until(lambda: all(f"for {name}: another sweep" in tail(log) for name in RUNS), 120), tail(log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM, tail(log)
    for name in RUNS:
        assert f"not started: {name} (stopped while another sweep held it)" in tail(log)
    assert "sweep s: stopped by SIGTERM; rerun it to resume" in tail(log)
    assert "start " not in tail(log) and not (root / "s" / RUNS[0]).exists()


@pytest.mark.slow
def test_a_sweep_killed_with_its_run_keeps_the_attempt_from_its_heartbeat(data_cache, tiny_data, tmp_path):
    """kill -9 to the sweep and its training run: the attempt counts, from its last heartbeat, exactly once.

    Before, nobody reaped the attempt and its CPU time was lost from the record. The training
    process is stopped (SIGSTOP) first, so its CPU counters stand still; the sweep's next heartbeat
    must then read the same ticks psutil reads (one tick of slack), before the kill. The rerun
    appends that heartbeat to the record ahead of its own attempt, and --collect sums both.
    """
    root, log = tmp_path / "out", tmp_path / "sweep.log"
    spec = write_sweep(tmp_path / "s.yaml", root, data_cache, steps=12)
    proc = launch(megamoe("sweep", str(spec), "--parallel", "1"), log)
    logs, run_dir = root / "s" / "logs", root / "s" / RUNS[0]
    beat_path = logs / f"{RUNS[0]}.inflight.json"
    assert poll_until(lambda: _logged_step(run_dir) >= 2, 300), tail(log)
    (train,) = [p for p in descendants(proc) if "train" in p.cmdline()]
    train.send_signal(signal.SIGSTOP)
    assert poll_until(lambda: train.status() == psutil.STATUS_STOPPED, 30)
    times = train.cpu_times()
    frozen, stopped = times.user + times.system + times.children_user + times.children_system, time.time()
    assert poll_until(lambda: beat_path.is_file() and beat_path.stat().st_mtime > stopped + 0.5, HEARTBEAT_S + 30)
    signal_group(proc, signal.SIGKILL)
    proc.wait()
    assert settled(proc), "a process of the killed sweep lived on"
    beat = json.loads(beat_path.read_text())
    assert (beat["pid"], beat["exit"], beat["lost"]) == (train.pid, None, True)
    assert beat["cpu_s"] == pytest.approx(frozen, abs=0.011)
    assert run(megamoe("sweep", str(spec), "--parallel", "1"), log, timeout=600) == 0, tail(log)
    found = read_attempts(logs / f"{RUNS[0]}.attempts.jsonl")
    assert [(a["exit"], a.get("lost", False)) for a in found] == [(None, True), (0, False)], found
    assert found[0] == beat and not beat_path.exists()
    assert run(megamoe("sweep", str(spec), "--collect"), log) == 0, tail(log)
    assert "(1 of them to their last heartbeat" in (root / "s" / "results.md").read_text()
    row = results(root)[RUNS[0]]
    assert (int(row["attempts"]), float(row["cpu_s"])) == (2, pytest.approx(sum(a["cpu_s"] for a in found), abs=1e-3))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm-to-the-sweep", "ctrl-c-to-its-group"])
def test_a_stop_signal_checkpoints_the_run_records_it_and_starts_no_more(data_cache, tiny_data, tmp_path, sig):
    """SIGTERM to the sweep process, or SIGINT to its process group (a terminal's Ctrl-C): exit 128 + N.

    Its run saves and stops, is reaped and recorded. Before, the sweep died at once: on SIGTERM the
    run stopped on its parent's death signal with nobody to record it, and on Ctrl-C the run got
    SIGINT too and died without a checkpoint (it now has a session of its own).
    """
    root, log = tmp_path / "out", tmp_path / "sweep.log"
    sweep = megamoe("sweep", str(write_sweep(tmp_path / "s.yaml", root, data_cache, steps=1000)), "--parallel", "1")
    proc = launch(sweep, log)
    run_dir, logs = root / "s" / RUNS[0], root / "s" / "logs"
    assert poll_until(lambda: _logged_step(run_dir) >= 3, 300), tail(log)
    descendants_before = descendants(proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # the sweep's process group, as a terminal sends it
    else:
        proc.send_signal(sig)
    assert proc.wait(120) == 128 + sig, tail(log)
    assert all_gone(descendants_before, 30), "a process of the stopped sweep lived on"
    assert f"{sig.name}: asking 1 runs to checkpoint and stop" in tail(log)
    assert f"sweep s: stopped by {sig.name}; rerun it to resume" in tail(log)
    assert f"stopped (resumable) {RUNS[0]}" in tail(log) and f"done {RUNS[0]}" not in tail(log)
    assert f"start {RUNS[1]}" not in tail(log) and _state(run_dir, steps=1000) == "resume"
    assert "stopped by SIGTERM" in _text(logs / f"{RUNS[0]}.log")
    (attempt,) = read_attempts(logs / f"{RUNS[0]}.attempts.jsonl")
    assert (attempt["state"], attempt["exit"], attempt.get("lost", False)) == ("new", 0, False)
    assert not (logs / f"{RUNS[0]}.inflight.json").exists()
