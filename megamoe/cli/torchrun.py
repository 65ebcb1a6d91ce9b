"""`python -m megamoe.cli.torchrun [torchrun args] -m megamoe train ...`: torchrun, made safe for megamoe.

The arguments are torchrun's. Three things differ:
1. The launcher ignores SIGUSR1. SLURM delivers its preemption notice to every process of the job
   step (`scancel --signal=USR1 JOB`); plain torchrun dies of it, and srun then kills its ranks
   mid-step. Here only the ranks act on it: they finish the step, save a checkpoint and exit 0.
2. `megamoe train`'s config and layout are checked once before any rank starts, so a bad key prints
   one line and exits 2, instead of once per rank followed by torchrun's traceback.
3. A failed rank, or a signal to the launcher, ends with one line per failed rank instead of
   torchrun's traceback. The exit status is the lowest failed rank's own (128 + N for signal N), where
   a rank that exited by itself wins over ranks killed by SIGTERM/SIGKILL: once one rank exits, torchrun
   sends those to the others, so a rank stopped mid-teardown must not hide the status of the run.
"""

from __future__ import annotations

import os
import signal
import sys


def _world_size(args) -> int | None:
    """Ranks the launch will start, when the node count and ranks per node are fixed numbers."""
    from torch.distributed.run import parse_min_max_nnodes

    low, high = parse_min_max_nnodes(args.nnodes)
    nproc = str(args.nproc_per_node)
    return low * int(nproc) if low == high and nproc.isdigit() else None


def check_train_args(args) -> int | None:
    """Validate a `-m megamoe train` command's config and layout; returns 2 after printing an error."""
    from megamoe.cli.main import split_config_args
    from megamoe.errors import MegamoeError
    from megamoe.parallel.layout import resolve_layout
    from megamoe.train.run import load_run_config

    script_args = list(args.training_script_args)
    if not (args.module and args.training_script == "megamoe" and script_args[:1] == ["train"]):
        return None
    world = _world_size(args)
    positional = [a for a in script_args[1:] if not a.startswith("-")]
    try:
        cfg = load_run_config(*split_config_args(positional))
        if world is not None:
            resolve_layout(cfg, world)
    except MegamoeError as err:
        if os.environ.get("SLURM_PROCID", "0") == "0":  # one line per job, not per node
            print(f"megamoe: error: {err}", file=sys.stderr)
        return 2
    return None


_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGKILL)  # what torchrun sends the ranks still running


def _report(err) -> int:
    """One line per failed rank of a ChildFailedError; returns the exit status to use."""
    failures = sorted(err.failures.items())
    for rank, failure in failures:
        how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"megamoe: rank {rank} (pid {failure.pid}) failed with {how}; its output is above", file=sys.stderr)
    codes = [failure.exitcode for _, failure in failures]
    own = [code for code in codes if -code not in _TEARDOWN_SIGNALS]
    code = (own or codes or [1])[0]
    return 128 - code if code < 0 else code or 1


def main(argv: list[str] | None = None) -> int:
    """Launch like torchrun; see the module docstring for what differs."""
    from megamoe.cli.main import setup_logging

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    setup_logging()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    status = check_train_args(args)
    if status is not None:
        return status
    try:
        run(args)
    except ChildFailedError as err:
        return _report(err)
    except SignalException as err:
        print(f"megamoe: the launcher got {err.sigval.name}; its ranks were stopped (see above)", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
