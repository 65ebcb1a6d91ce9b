"""What every `megamoe train` a sweep launches cost: one JSON line per attempt in logs/<run>.attempts.jsonl.

An attempt is one process, from launch to exit: a fresh start, or a resume after a kill or a
preemption. Its record holds the wall seconds, the CPU seconds (user + system, from os.wait4 on its
pid: that process and every descendant it waited for, such as torchrun's ranks, and nothing else),
the exit status (negative: killed by that signal) and where it ran. A record is appended and
fsynced when the process has been reaped.

While it runs, the attempt's heartbeat (logs/<run>.inflight.json, replaced every HEARTBEAT_S) holds
the same fields so far, its CPU read from /proc over the live process tree (utils/proctree.py). If
the sweep is killed with its runs (kill -9, a machine's end), nobody reaps the attempt, and the
heartbeat is its record: it counts as an attempt with `"exit": null, "lost": true`, short of the
truth by at most HEARTBEAT_S of work and the checkpoint it may have saved on SIGTERM. The next
attempt of the run appends it to the record first (settle), and a reaped record supersedes a
heartbeat of the same attempt (same pid and start), so nothing counts twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megamoe.utils.fs import atomic_write_text
from megamoe.utils.proctree import tree_usage

PR_SET_PDEATHSIG = 1
HEARTBEAT_S = 10.0
"""Seconds between two heartbeats of an attempt: what a killed sweep's record of it may miss."""
POLL_S = 0.5
"""How often a sweep or an attempt wrapper checks whether a run has exited (and beats)."""


def attempts_file(logs: Path, run_name: str) -> Path:
    """The attempts record of a run."""
    return logs / f"{run_name}.attempts.jsonl"


def heartbeat_file(attempts: Path) -> Path:
    """The heartbeat of the attempt in flight of the run whose attempts record is `attempts`."""
    return attempts.with_name(attempts.name.replace(".attempts.jsonl", ".inflight.json"))


def reap(pid: int, block: bool) -> tuple[int, os.struct_rusage] | None:
    """(exit status, resource usage) of a child that has exited; None while it runs (block=False)."""
    found, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
    return None if found == 0 else (os.waitstatus_to_exitcode(status), usage)


def _entry(run: str, state: str, pid: int, started: float, wall_s: float, cpu: tuple, code: int | None) -> dict:
    """One attempt's fields; cpu is (user_s, sys_s, max_rss_mib)."""
    user_s, sys_s, rss_mib = cpu
    return {
        "run": run, "state": state, "exit": code, "pid": pid,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(wall_s, 3), "cpu_s": round(user_s + sys_s, 3), "user_s": round(user_s, 3),
        "sys_s": round(sys_s, 3), "max_rss_mib": round(rss_mib, 1), "host": socket.gethostname(),
    }  # fmt: skip


def _append(path: Path, entry: dict) -> None:
    """Append one line to an attempts record and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _key(entry: dict) -> tuple:
    """What identifies an attempt: its process and start (records written before pids were kept have none)."""
    return (entry.get("pid"), entry.get("started"))


@dataclass
class Tracked:
    """An attempt in flight: its heartbeat while it runs, its record once reaped."""

    path: Path
    """The run's attempts record."""
    run: str
    state: str
    pid: int
    started: float = field(default_factory=time.time)
    """time.time() at launch."""
    clock: float = field(default_factory=time.monotonic)
    """time.monotonic() at launch."""
    last_beat: float = float("-inf")
    peak_rss_mib: float = 0.0
    """The largest peak RSS of one of its processes over the beats so far (a process that exited has none)."""

    def __post_init__(self) -> None:
        settle(self.path)  # the heartbeat of an earlier attempt nobody reaped is a record before this one beats

    def beat(self) -> None:
        """Replace the heartbeat if HEARTBEAT_S have passed since the last (best effort: a full disk skips it)."""
        now = time.monotonic()
        if now - self.last_beat < HEARTBEAT_S or (usage := tree_usage(self.pid)) is None:
            return
        self.last_beat, self.peak_rss_mib = now, max(self.peak_rss_mib, usage.max_rss_mib)
        cpu = (usage.user_s, usage.sys_s, self.peak_rss_mib)
        entry = {**_entry(self.run, self.state, self.pid, self.started, now - self.clock, cpu, None), "lost": True}
        with contextlib.suppress(OSError):
            atomic_write_text(heartbeat_file(self.path), json.dumps(entry) + "\n")

    def close(self, usage, code: int) -> dict:
        """Record the reaped attempt (usage: its os.wait4 rusage), drop its heartbeat; returns the record."""
        cpu = (usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024)
        entry = _entry(self.run, self.state, self.pid, self.started, time.monotonic() - self.clock, cpu, code)
        _append(self.path, entry)
        heartbeat_file(self.path).unlink(missing_ok=True)
        return entry


def _read_heartbeat(path: Path) -> dict | None:
    """The heartbeat of the run whose attempts record is path; None if there is none (or it is unreadable)."""
    try:
        return json.loads(heartbeat_file(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def in_flight(path: Path, now: float | None = None) -> str:
    """A line on the run's unsettled heartbeat ('' without one): running if it beat lately, else lost."""
    beat = _read_heartbeat(path)
    if beat is None:
        return ""
    try:
        age = (time.time() if now is None else now) - heartbeat_file(path).stat().st_mtime
    except OSError:
        return ""
    so_far = f"{beat['cpu_s']:,.0f} CPU s, {beat['wall_s']:,.0f} wall s"
    where = f"pid {beat['pid']} on {beat['host']}"
    if age <= 3 * HEARTBEAT_S:
        return f"running: {where}, {so_far} so far, heartbeat {age:.0f} s ago"
    return f"last attempt not reaped ({where}, heartbeat {age / 60:.0f} min old): {so_far} counted"


def settle(path: Path) -> None:
    """Append the run's heartbeat, an attempt nobody reaped, to its record (unless recorded) and remove it.

    Only where no attempt of the run is in flight: a new attempt's start (the sweep holds the run's
    lock; a SLURM array task runs its job alone) or a job whose runs are all done (archive.py).
    """
    beat = _read_heartbeat(path)
    if beat is not None and _key(beat) not in {_key(a) for a in _read_lines(path)}:
        _append(path, beat)
    heartbeat_file(path).unlink(missing_ok=True)


def _read_lines(path: Path) -> list[dict]:
    """The lines of an attempts record ([] if none); a torn last line (a kill mid-write) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_attempts(path: Path) -> list[dict]:
    """The attempts of a run: its record and a heartbeat not yet settled, a lost one dropped where it was reaped."""
    found = _read_lines(path)
    if (beat := _read_heartbeat(path)) is not None:
        found.append(beat)
    seen = {_key(a) for a in found if not a.get("lost")}
    out = []
    for entry in found:
        if entry.get("lost") and _key(entry) in seen:
            continue
        seen.add(_key(entry))
        out.append(entry)
    return out


def stop_with_parent(parent: int):
    """A preexec_fn: the child gets SIGTERM (checkpoint and stop) when `parent` dies; None off Linux."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None
    if prctl is None:
        return None

    def apply() -> None:  # runs in the child between fork and exec: nothing but system calls here
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return apply
