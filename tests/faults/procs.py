"""Real processes and real signals for the fault-injection tests (no monkeypatched crashes).

Every command runs in its own session, and a kill reaches the whole command: the session and every
descendant (torchrun starts each rank in a session of its own, a data-prepare pool forks workers).
A hung command is killed and reported with the tail of its log instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give megamoe, plus extra variables."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        **extra,
    }


def megamoe(*args: str) -> list[str]:
    """The `megamoe ...` command line."""
    return [sys.executable, "-m", "megamoe", *args]


def start(cmd: list[str], log: Path, environ: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start cmd in a new session with stdout and stderr appended to log."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=environ or env(), cwd=REPO, start_new_session=True, **kwargs
        )


def tail(log: Path, chars: int = 4000) -> str:
    """The end of a log file."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every live process started by proc (torchrun starts its ranks in sessions of their own)."""
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


SIGNALLED: dict[int, list[psutil.Process]] = {}
"""pid of a command → its descendants when signal_group last reached them (some run in sessions of their own)."""


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send sig to every process of proc's session and to all its descendants (ignored where gone)."""
    tree = descendants(proc)
    SIGNALLED.setdefault(proc.pid, []).extend(tree)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(sig)


def wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    """proc's exit status; a command still running after timeout is killed and the test fails."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait()
        hung = f"{proc.args} still running after {timeout:.0f} s (hung?)"
        raise AssertionError(f"{hung}; log tail:\n{tail(log)}") from None


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, poll_s: float = 0.01) -> bool:
    """Poll until ready() holds while proc runs; False if proc ended (or timeout passed) first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(poll_s)
    return False


def kill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, sig: int = signal.SIGKILL, poll_s: float = 0.01
) -> bool:
    """Send sig to proc's session as soon as ready() holds; False if proc ended (or timeout passed) first."""
    if not wait_for(proc, ready, timeout, poll_s):
        return False
    signal_group(proc, sig)
    return True


def kill_after(proc: subprocess.Popen, seconds: float, sig: int = signal.SIGKILL) -> bool:
    """Send sig to proc's session after `seconds`; False if proc ended first."""
    start_t = time.monotonic()
    return kill_when(proc, lambda: time.monotonic() - start_t >= seconds, seconds + 1.0, sig)


def all_gone(processes: list[psutil.Process], timeout: float) -> bool:
    """Every one of processes has exited within timeout (no orphan left running)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


STARTED: list[subprocess.Popen] = []
"""Every process group a test started; the autouse fixture kills what is left when the test ends."""


def group_gone(proc: subprocess.Popen, timeout: float) -> bool:
    """Every process of proc's session (process group) has exited within timeout: no orphan left running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def settled(proc: subprocess.Popen, timeout: float = 10) -> bool:
    """Every process of proc's group, and every descendant signal_group reached, has exited (then it is forgotten)."""
    gone = group_gone(proc, timeout) and all_gone(SIGNALLED.pop(proc.pid, []), timeout)
    if gone and proc in STARTED:
        STARTED.remove(proc)
    return gone


def launch(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """start() that also records the process for cleanup."""
    proc = start(cmd, log, **kwargs)
    STARTED.append(proc)
    return proc


def run(cmd: list[str], log: Path, timeout: float = 180, **kwargs) -> int:
    """Run cmd to its end (fails the test if it hangs); returns its exit status."""
    return finish(launch(cmd, log, **kwargs), timeout, log)


def finish(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    """wait() for proc's exit status, then forget its group once it has ended."""
    status = wait(proc, timeout, log)
    settled(proc)
    return status


def poll_until(cond, timeout: float) -> bool:
    """Poll cond until it holds (True) or timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def fill(disk: Path, leave: int) -> None:
    """Fill the filesystem of disk with one file, leaving about `leave` bytes free."""
    (disk / "filler").unlink(missing_ok=True)
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))


def file_limit(limit: int):
    """A preexec_fn: RLIMIT_FSIZE = limit bytes, SIGXFSZ ignored, so a larger write fails with EFBIG."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply
