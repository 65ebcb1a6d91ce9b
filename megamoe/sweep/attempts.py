"""What every `megamoe train` a sweep launches cost: one JSON line per attempt in logs/<run>.attempts.jsonl.

An attempt is one process, from launch to exit: a fresh start, or a resume after a kill or a
preemption. Its record holds the wall seconds, the CPU seconds (user + system, from os.wait4 on its
pid: that process and every descendant it waited for, such as torchrun's ranks, and nothing else),
the exit status (negative: killed by that signal) and where it ran. A record is appended and
flushed when the process has been reaped, so a killed sweep loses at most the attempts in flight.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def attempts_file(logs: Path, run_name: str) -> Path:
    """The attempts record of a run."""
    return logs / f"{run_name}.attempts.jsonl"


def reap(pid: int, block: bool) -> tuple[int, os.struct_rusage] | None:
    """(exit status, resource usage) of a child that has exited; None while it runs (block=False)."""
    found, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
    return None if found == 0 else (os.waitstatus_to_exitcode(status), usage)


def record(path: Path, run: str, state: str, started: float, wall_s: float, usage, code: int) -> dict:
    """Append one attempt (started: a time.time() stamp) to path and flush it; returns the record."""
    entry = {
        "run": run, "state": state, "exit": code,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(wall_s, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "user_s": round(usage.ru_utime, 3), "sys_s": round(usage.ru_stime, 3),
        "max_rss_mib": round(usage.ru_maxrss / 1024, 1), "host": socket.gethostname(),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return entry


def read_attempts(path: Path) -> list[dict]:
    """The attempts recorded in path ([] if none); a torn last line (a kill mid-write) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
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
