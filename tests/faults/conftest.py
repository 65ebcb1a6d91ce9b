"""Fixtures of the fault-injection tests: no process outlives its test; a small real filesystem."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.faults.procs import STARTED, signal_group


@pytest.fixture(autouse=True)
def _no_orphans():
    """Kill every process group the test started and did not see end (a failing test must not leave one)."""
    yield
    while STARTED:
        proc = STARTED.pop()  # a group outlives its leader while any member runs (an orphaned child)
        signal_group(proc, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk (unmounted afterwards), or None where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
