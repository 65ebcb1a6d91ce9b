"""CPU seconds and peak memory of a live process tree, read from Linux's /proc while it runs.

os.wait4 gives a process's usage only once it has exited. A sweep that may itself be killed needs
the figure earlier (sweep/attempts.py's heartbeat): the sum, over the process and every live
descendant, of its own user and system time plus that of the children it has reaped (cutime,
cstime). A live process is in no one's reaped total, and a reaped one is in exactly one, so nothing
counts twice. Time is in clock ticks (1/100 s on Linux), so each process adds at most a tick of
rounding per field.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class TreeUsage:
    """User and system CPU seconds of a process tree, and the largest peak RSS of one of its processes."""

    user_s: float
    sys_s: float
    max_rss_mib: float
    processes: int


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_by_parent() -> dict[int, list[int]]:
    """ppid → the pids of its live children, from one pass over /proc."""
    out: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            out.setdefault(int(fields[1]), []).append(int(entry.name))
    return out


def _peak_rss_mib(pid: int) -> float:
    """VmHWM of a process in MiB (0 if it is gone or a zombie)."""
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return 0.0
    found = [line.split()[1] for line in lines if line.startswith("VmHWM:")]
    return int(found[0]) / 1024 if found else 0.0


def tree_usage(pid: int) -> TreeUsage | None:
    """Usage of pid and its live descendants (with what each reaped); None off Linux or once pid is gone."""
    if sys.platform != "linux" or _stat(pid) is None:
        return None
    tick, children = os.sysconf("SC_CLK_TCK"), _children_by_parent()
    user = system = 0
    peak, todo, seen = 0.0, [pid], 0
    while todo:
        current = todo.pop()
        fields = _stat(current)
        if fields is None:  # exited since the pass over /proc: its time is in its parent's reaped total
            continue
        user, system = user + int(fields[11]) + int(fields[13]), system + int(fields[12]) + int(fields[14])
        peak, seen = max(peak, _peak_rss_mib(current)), seen + 1
        todo += children.get(current, [])
    return TreeUsage(user / tick, system / tick, round(peak, 1), seen)
