"""Several `megamoe train` runs, one after another, in one torchrun world (RUNS_JSON: a list of argument lists).

A world's start (torchrun, the ranks' Python and torch imports, the rendezvous) costs ~20 s on 2
cores against ~3 s for a 6-step tiny run, so the layout tests run each world size's layouts in one
world. The default process group is created here once; `megamoe train` then uses it as it is and
tears down only its own megatron-core groups (parallel/groups.py), as it would inside a user's
script. Each run starts from the same state as a fresh process would: the trainer seeds itself
from its config. A failed run ends the world with its exit code, after printing which run failed.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch.distributed as dist

from megamoe.cli.main import main


def run_all(runs: list[list[str]]) -> int:
    """Each run's `megamoe train ARGS` in turn; the first non-zero exit code, or 0."""
    for i, args in enumerate(runs):
        print(f"train_world: run {i + 1}/{len(runs)}: {' '.join(args[-3:])}", flush=True)
        rc = main(["train", *args])
        if rc:
            print(f"train_world: run {i + 1} exited {rc}", file=sys.stderr, flush=True)
            return rc
    return 0


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rc = run_all(json.loads(Path(sys.argv[1]).read_text()))
    dist.destroy_process_group()
    raise SystemExit(rc)
