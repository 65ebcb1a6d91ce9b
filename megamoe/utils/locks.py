"""Locks that cannot outlive their holder: fcntl locks, which the kernel drops when the holder dies.

Waiting is bounded and logged every few seconds with the holder's pid, so nothing waits silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from megamoe.errors import MegamoeError

log = logging.getLogger(__name__)
REPORT_EVERY_S = 10.0
_held: dict[Path, IO[str]] = {}
"""Locks this process holds for its whole life (see hold_for_life)."""


def _acquire(fh: IO[str], path: Path, timeout_s: float, what: str) -> None:
    """Take the exclusive lock on fh, waiting at most timeout_s and saying who is waited for; record our pid."""
    start, told = time.monotonic(), 0.0
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            waited = time.monotonic() - start
            holder = path.read_text().strip() or "?"
            if waited > timeout_s:
                raise MegamoeError(
                    f"{path}: waited {waited:.0f} s for pid {holder} to finish {what}; "
                    "if that process is stuck, kill it and start again"
                ) from None
            if waited - told >= REPORT_EVERY_S:
                log.info("waiting for pid %s to finish %s (%.0f s so far; lock %s)", holder, what, waited, path)
                told = waited
            time.sleep(0.2)
    fh.truncate(0)
    fh.write(str(os.getpid()))
    fh.flush()


@contextlib.contextmanager
def held_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on path for the body of a with-statement."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        _acquire(fh, path, timeout_s, what)
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


def hold_for_life(path: Path, timeout_s: float, what: str) -> None:
    """Take an exclusive lock on path and keep it until this process exits (a no-op if it already holds it)."""
    path = path.resolve()
    if path in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - kept open for the life of the process
    try:
        _acquire(fh, path, timeout_s, what)
    except BaseException:
        fh.close()
        raise
    _held[path] = fh
