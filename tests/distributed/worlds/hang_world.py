"""A 2-rank world where one rank misbehaves: the other must fail within the collective timeout, not hang.

Usage (under torchrun): hang_world.py stuck|crash. Rank 1 either stops answering (stuck) or raises
(crash) after the groups exist; rank 0 waits in a barrier.
"""

from __future__ import annotations

import sys
import time

import torch.distributed as dist

from megamoe.config import load_config
from megamoe.parallel.groups import init_groups
from megamoe.parallel.layout import resolve_layout


def main(mode: str) -> None:
    cfg = load_config(None, ["model.vocab_size=512"])
    init_groups(resolve_layout(cfg, 2), timeout_s=5)
    if dist.get_rank() == 1:
        if mode == "crash":
            raise RuntimeError("rank 1 failed on purpose")
        time.sleep(600)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
