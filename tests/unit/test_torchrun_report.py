"""megamoe's torchrun: which failed rank's status the launch exits with."""

from __future__ import annotations

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from megamoe.cli.torchrun import _report


def failed(tmp_path, *exitcodes: int) -> ChildFailedError:
    """torchrun's own error for ranks 0.. that ended with these exit codes (negative: killed by signal)."""
    failures = {
        rank: ProcessFailure(rank, 1000 + rank, code, str(tmp_path / f"no_error_file_{rank}"))
        for rank, code in enumerate(exitcodes)
    }
    return ChildFailedError("megamoe", failures)


@pytest.mark.parametrize(
    ("exitcodes", "status"),
    [
        ((-15, 3), 3),  # rank 1 stopped by itself; torchrun then SIGTERMed rank 0 mid-teardown
        ((-9, 3), 3),  # ... or SIGKILLed it after the grace period
        ((3, -15), 3),
        ((-15,), 143),  # only a signal: 128 + N
        ((-11, 3), 139),  # a crash by signal is the rank's own failure, and rank 0's is reported
    ],
)
def test_exit_status_is_a_ranks_own(tmp_path, capsys, exitcodes, status):
    """The status is the lowest rank's own; SIGTERM/SIGKILL sent during teardown never hides it."""
    assert _report(failed(tmp_path, *exitcodes)) == status
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(exitcodes) and all(line.startswith("megamoe: rank ") for line in lines)
