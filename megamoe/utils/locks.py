"""Locks that cannot outlive their holder: fcntl locks, which the kernel drops when the holder dies.

The holder writes who it is (pid, host, since when) into the lock file, and a waiter says whom it
waits for at once and then at intervals, so nothing waits silently; a deadline is optional.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from megamoe.errors import MegamoeError

log = logging.getLogger(__name__)
LOCK_POLL_S, LOCK_REMINDER_S = 0.2, 60.0
"""How often a waiter retries a busy lock, and how often it says again that it is still waiting."""
_held: dict[Path, IO[str]] = {}
"""Locks this process holds for its whole life (see hold_for_life)."""


def note_holder(fh: IO[str], who: str) -> None:
    """Replace the holder note of a lock file held through fh (best effort: a full disk must not stop us)."""
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{who} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
    except OSError:
        pass


def open_locked(
    path: Path,
    waiting: Callable[[float, str], None],
    remind_s: float = LOCK_REMINDER_S,
    timeout_s: float | None = None,
) -> IO[str]:
    """Open path and take an exclusive lock on it; closing the returned file (or dying) releases it.

    While another process holds it, waiting(seconds so far, holder note) is called at once and then
    every remind_s seconds; after timeout_s (if given) a MegamoeError names the holder.
    """
    started, next_note = time.monotonic(), 0.0
    while isinstance(got := try_lock(path), str):
        waited = time.monotonic() - started
        if timeout_s is not None and waited > timeout_s:
            raise MegamoeError(f"{path}: waited {waited:.0f} s for {got}; if it is stuck, kill it and start again")
        if waited >= next_note:
            waiting(waited, got)
            next_note = waited + remind_s
        time.sleep(LOCK_POLL_S)
    return got


def try_lock(path: Path) -> IO[str] | str:
    """The open file holding an exclusive lock on path (noted as this pid's), or, if another holds it, its note."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - the caller closes it; "a+" so a waiter never truncates the note
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        return holder
    note_holder(fh, f"pid {os.getpid()}")
    return fh


def _say(what: str, path: Path) -> Callable[[float, str], None]:
    """A waiting() that logs what is waited for."""

    def waiting(seconds: float, holder: str) -> None:
        if seconds > 0:
            log.info("waiting for %s to finish %s (%.0f s so far; lock %s)", holder, what, seconds, path)

    return waiting


REPORT_EVERY_S = 10.0


@contextlib.contextmanager
def held_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on path for the body of a with-statement (waiting at most timeout_s)."""
    with open_locked(path, _say(what, path), REPORT_EVERY_S, timeout_s) as fh:
        try:
            yield
        finally:
            fh.truncate(0)


def hold_for_life(path: Path, timeout_s: float, what: str) -> None:
    """Take an exclusive lock on path and keep it until this process exits (a no-op if it already holds it)."""
    path = path.resolve()
    if path not in _held:
        _held[path] = open_locked(path, _say(what, path), REPORT_EVERY_S, timeout_s)
