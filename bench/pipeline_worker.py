"""One torchrun world of bench/pipeline_bubble.py: every schedule × m on p ranks, timed per rank.

Busy time is the time inside the stage's compute: PipelineStage.forward_one_chunk, backward_one_chunk
(and backward_weight_one_chunk) and the schedule's loss; waits for sends and receives are outside it.
Each step starts after a barrier and ends with the pipeline's loss all-reduce, so every rank's wall
time spans the same step. Rank 0 appends one JSON line per (schedule, m) to args.out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, schedules

from megamoe.config import load_config
from megamoe.model import build_model
from megamoe.parallel.groups import init_groups
from megamoe.parallel.layout import resolve_layout
from megamoe.parallel.pipeline_run import Pipeline
from megamoe.parallel.specs import ParallelFactory

BUSY = {"wall": 0.0, "cpu": 0.0, "depth": 0}


def timed(fn):
    """fn, its outermost calls' wall and thread CPU time added to BUSY."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        BUSY["depth"] += 1
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            BUSY["depth"] -= 1
            if BUSY["depth"] == 0:
                BUSY["wall"] += time.perf_counter() - wall
                BUSY["cpu"] += time.thread_time() - cpu

    return wrapper


def instrument() -> None:
    """Time the stage compute and the loss of every schedule."""
    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        setattr(PipelineStage, name, timed(getattr(PipelineStage, name)))
    schedules._PipelineSchedule._compute_loss = timed(schedules._PipelineSchedule._compute_loss)


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The benchmark model (no data: the vocabulary is fixed)."""
    return [
        f"model.d_model={args.d_model}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
        f"model.seq_len={args.seq}", f"model.vocab_size={args.vocab}", f"train.micro_batch_size={args.mb}",
    ]  # fmt: skip


def config(args: argparse.Namespace, p: int, schedule: str, m: int):
    """The config of one (p, schedule, m) point; interleaved uses v = args.v virtual stages."""
    v = args.v if schedule == "interleaved_1f1b" else 1
    return load_config(None, [*model_overrides(args), f"parallel.pipeline_parallel={p}", "parallel.zero_stage=0",
                              f"parallel.pipeline_schedule={schedule}", f"parallel.virtual_stages={v}",
                              f"train.global_batch_size={m * args.mb}"])  # fmt: skip


def run_point(cfg, groups, args: argparse.Namespace) -> list[tuple[float, float, float]]:
    """(busy wall, busy CPU, step wall) seconds of each timed step on this rank."""
    model = build_model(cfg.model, 0, ParallelFactory(1, groups, False), cfg.moe)
    pipe = Pipeline(model, cfg, groups)
    n = cfg.train.global_batch_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (n, cfg.model.seq_len + 1), generator=gen)
    ids = torch.arange(n)
    out = []
    for step in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        BUSY.update(wall=0.0, cpu=0.0)
        start = time.perf_counter()
        pipe.train_step(tokens[:, :-1], tokens[:, 1:], ids, step)
        if step >= args.warmup:
            out.append((BUSY["wall"], BUSY["cpu"], time.perf_counter() - start))
    return out


def main() -> None:
    """Run every (schedule, m) on this world; rank 0 writes the JSON lines."""
    args = argparse.Namespace(**json.loads(os.environ["PIPELINE_BUBBLE_ARGS"]))
    instrument()
    world = int(os.environ["WORLD_SIZE"])
    first = config(args, world, args.schedules[0], args.m[0])
    groups = init_groups(resolve_layout(first, world), timeout_s=600)
    for schedule in args.schedules:
        for m in args.m:
            cfg = config(args, world, schedule, m)
            local = dataclasses.replace(groups, layout=resolve_layout(cfg, world))
            steps = run_point(cfg, local, args)
            ranks = [None] * world
            dist.all_gather_object(ranks, steps)
            if groups.rank == 0:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"p": world, "schedule": schedule, "m": m, "ranks": ranks}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
