"""Stop requests: SIGTERM/SIGUSR1 (SLURM preemption), or the death of the launcher (torchrun).

On any of them the ranks finish the current step, agree, save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Context manager that records a preemption signal instead of dying on it.

    Under torchrun it also watches the launcher: a rank whose parent process has gone (a launcher
    killed with SIGKILL cannot forward anything) stops at the next step boundary like a signalled
    one, instead of training on as an orphan beside a restarted run.
    """

    def __init__(self, signals: tuple[int, ...] = SIGNALS) -> None:
        self.signal_name: str | None = None
        self.signum: int | None = None
        """The signal that arrived (None before one, and for the launcher's death)."""
        self._signals = signals
        self._previous: dict[int, object] = {}
        self._parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name, self.signum = signal.Signals(signum).name, signum

    @property
    def raised(self) -> bool:
        """A preemption signal arrived, or the launcher died."""
        if self.signal_name is None and self._parent is not None and os.getppid() != self._parent:
            self.signal_name = f"the death of the launcher (pid {self._parent})"
        return self.signal_name is not None

    def __enter__(self) -> PreemptionFlag:
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
