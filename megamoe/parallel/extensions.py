"""DeepSpeed's JIT-built CPU op, built under a lock that cannot outlive its holder.

DeepSpeed's first start on a CPU compiles its shared-memory comm op (about 40 s) under torch's
`FileBaton`: a plain `lock` file in the op's build folder. A process killed during that build
leaves the file behind, and every later start then waits on it forever, printing nothing (seen
under a real SLURM requeue). megamoe loads the op itself before DeepSpeed does, holding an fcntl
lock on a file next to that folder. The kernel releases an fcntl lock when its holder dies, however
it dies, so whoever holds it knows that no megamoe build is running: a baton `lock` file found then
is stale and is removed. DeepSpeed later finds the op already loaded in the process. Waiting for
another rank's build is logged every few seconds, with the holder's pid, and has a deadline.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from megamoe.utils.locks import held_lock

log = logging.getLogger(__name__)
OP = "ShareMemCommBuilder"
PREEMPTION_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}
BUILD_TIMEOUT_S = 900.0
"""Longest wait for another process's build: a build takes about a minute on 2 cores."""


def _build_dir(name: str) -> Path:
    """The folder torch's cpp_extension builds op `name` in (where its baton `lock` file lives)."""
    from torch.utils.cpp_extension import _get_build_directory  # the function DeepSpeed's jit_load goes through

    return Path(_get_build_directory(name, verbose=False))


def ensure_deepspeed_ops(timeout_s: float = BUILD_TIMEOUT_S) -> None:
    """Load (building once per machine) DeepSpeed's CPU shm comm op under a lock that dies with its holder."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(OP)
    if builder is None or installed_ops.get(builder.NAME) or not deepspeed.ops.__compatible_ops__.get(builder.NAME):
        return  # no such op on this accelerator, or it was built at install time: nothing is compiled at run time
    folder = _build_dir(builder.NAME)
    what = f"building DeepSpeed's {builder.NAME} op in {folder}"
    with held_lock(folder.parent / f".{builder.NAME}.megamoe-lock", timeout_s, what):
        baton = folder / "lock"
        if baton.exists():
            log.warning("removing %s: a build of DeepSpeed's %s op was killed and left it", baton, builder.NAME)
            baton.unlink()
        if not any(folder.glob("*.so")):
            log.info("building DeepSpeed's %s op in %s (once per machine, about a minute)", builder.NAME, folder)
        # SLURM delivers a preemption notice to every process of the step, the compiler included: block
        # it while building (children inherit the mask); the rank's own handler gets it afterwards.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        try:
            builder.load(verbose=False)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
