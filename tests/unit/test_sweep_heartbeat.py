"""An attempt's heartbeat: CPU of a live process tree from /proc, and a killed sweep's attempts counted once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from megamoe.sweep.attempts import HEARTBEAT_S, Tracked, heartbeat_file, in_flight, read_attempts, reap, settle
from megamoe.utils.proctree import tree_usage
from tests.faults.procs import poll_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def burn(seconds: float) -> str:
    """Python source that spends `seconds` of CPU time."""
    return f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\n"


CHILD = burn(0.6) + "import sys\nprint('burnt', flush=True)\nsys.stdin.read()\n"
"""A live descendant: burns 0.6 s, says so, and waits for its stdin to close."""
ROOT = f"""import subprocess, sys
subprocess.run([sys.executable, "-S", "-c", {burn(0.6)!r}])
child = subprocess.Popen([sys.executable, "-S", "-c", {CHILD!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()
{burn(0.3)}
print("ready", flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""
"""A reaped child (0.6 s), a live one (0.6 s) and its own 0.3 s; it exits once its stdin closes."""


def test_tree_usage_counts_the_live_descendants_and_the_reaped_children():
    """A sample taken while idle matches os.wait4's total at exit, less the exits themselves.

    The oracle is the kernel's own total, os.wait4 on the root after it and its live child exit.
    The sample floors each of 6 tick counters (utime, stime, cutime, cstime of the root; utime,
    stime of the child) to 1/100 s, and after it only the two interpreters' exits run (~0.02 s each
    here), so the total may exceed it by at most 0.06 + their exits: 0.25 s leaves room for a slow
    machine. Dropping the live child (or the reaped one) loses 0.6 s.
    """
    root = subprocess.Popen([sys.executable, "-S", "-c", ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert root.stdout.readline().strip() == b"ready"
    sample = tree_usage(root.pid)
    root.stdin.close()
    code, usage = reap(root.pid, block=True)
    root.returncode = code
    assert code == 0 and sample is not None and sample.processes == 2
    sampled, total = sample.user_s + sample.sys_s, usage.ru_utime + usage.ru_stime
    assert sampled >= 1.5, sample
    assert -0.01 <= total - sampled <= 0.25, (sample, total)
    assert sample.max_rss_mib > 1
    assert tree_usage(root.pid) is None


def beat_of(pid: int, started: str, cpu_s: float) -> dict:
    """What a heartbeat holds (the fields that matter here)."""
    return {"run": "r", "state": "new", "exit": None, "pid": pid, "started": started, "cpu_s": cpu_s, "lost": True}


def write(path: Path, entries: list[dict]) -> None:
    """Write an attempts record."""
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_a_heartbeat_counts_once_until_settled_and_yields_to_its_reaped_record(tmp_path):
    """read_attempts: an unsettled heartbeat is an attempt; a reaped record of the same attempt replaces it."""
    path = tmp_path / "r.attempts.jsonl"
    beat = heartbeat_file(path)
    beat.write_text(json.dumps(beat_of(11, "2026-11-30T10:00:00Z", 5.0)))
    assert [(a["pid"], a["lost"]) for a in read_attempts(path)] == [(11, True)]
    reaped = {**beat_of(11, "2026-11-30T10:00:00Z", 6.0), "exit": 0}
    del reaped["lost"]
    write(path, [reaped])  # the sweep reaped it after all (a collect ran in between)
    assert [(a["cpu_s"], a["exit"]) for a in read_attempts(path)] == [(6.0, 0)]
    settle(path)
    assert not beat.exists() and len(path.read_text().splitlines()) == 1
    lost = beat_of(12, "2026-11-30T11:00:00Z", 7.0)
    beat.write_text(json.dumps(lost))
    settle(path)
    beat.write_text(json.dumps(lost))  # as if killed between the append and the removal
    assert [a["cpu_s"] for a in read_attempts(path)] == [6.0, 7.0]
    settle(path)
    assert [a["cpu_s"] for a in read_attempts(path)] == [6.0, 7.0] and not beat.exists()


def test_the_listing_says_whether_a_heartbeat_is_live_or_left_by_a_killed_sweep(tmp_path):
    """--dry-run's note: running while the heartbeat is at most 3 beats old, then a lost attempt, counted."""
    path = tmp_path / "r.attempts.jsonl"
    assert in_flight(path) == ""
    beat = {**beat_of(11, "2026-11-30T10:00:00Z", 1234.5), "wall_s": 2000.0, "host": "node1"}
    heartbeat_file(path).write_text(json.dumps(beat))
    written = heartbeat_file(path).stat().st_mtime
    live = in_flight(path, now=written + 2)
    assert live == "running: pid 11 on node1, 1,234 CPU s, 2,000 wall s so far, heartbeat 2 s ago"
    assert in_flight(path, now=written + 3 * HEARTBEAT_S).startswith("running")
    stale = in_flight(path, now=written + 3600)
    assert stale == "last attempt not reaped (pid 11 on node1, heartbeat 60 min old): 1,234 CPU s, 2,000 wall s counted"


def test_the_next_attempt_records_the_heartbeat_of_one_nobody_reaped(tmp_path):
    """Tracked: a beat of a live process, the sweep 'dies', the next attempt appends it before its own."""
    path = tmp_path / "logs" / "r.attempts.jsonl"
    first = subprocess.Popen([sys.executable, "-S", "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    first.stdout.readline()
    tracked = Tracked(path, "r", "new", first.pid)
    tracked.beat()
    alive = json.loads(heartbeat_file(path).read_text())
    assert (alive["pid"], alive["exit"], alive["lost"]) == (first.pid, None, True) and alive["cpu_s"] >= 0.6
    assert alive["max_rss_mib"] > 1
    os.kill(first.pid, signal.SIGKILL)
    assert poll_until(lambda: psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE, 30)
    tracked.last_beat = float("-inf")
    tracked.beat()  # a zombie: its CPU stays, its memory is gone, the peak so far is kept
    beat = json.loads(heartbeat_file(path).read_text())
    assert beat["cpu_s"] >= alive["cpu_s"] and beat["max_rss_mib"] == alive["max_rss_mib"]
    first.returncode = reap(first.pid, block=True)[0]  # the sweep that tracked it is gone
    second = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    tracked = Tracked(path, "r", "resume", second.pid)
    assert not heartbeat_file(path).exists()
    code, usage = reap(second.pid, block=True)
    second.returncode = code
    tracked.close(usage, code)
    found = read_attempts(path)
    assert [(a["state"], a["exit"], a.get("lost", False)) for a in found] == [("new", None, True), ("resume", 0, False)]
    assert found[0]["cpu_s"] == beat["cpu_s"]
