"""Layout-independent randomness for stochastic routers (SparseMixer-v2 sampling, input jitter).

Shape legend: L sequence, l this rank's rows of it, B batch.
Every sequence draws its own stream from a generator seeded by (seed, step, layer, kind, sample
id), where the sample id is the sequence's index in the training data. A token therefore gets the
same draw whatever the layout: on every tensor-parallel rank, under any DP/EP split, and in the
single-process reference. Without a context (direct calls, tests) draws come from torch's
default generator.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingContext:
    """What stochastic routers need: the run's seed, the optimizer step, and each sequence's sample id."""

    seed: int
    step: int
    sample_ids: tuple[int, ...]


def _stream_seed(ctx: RoutingContext, layer: int, kind: str, sample_id: int) -> int:
    """A stable 63-bit seed for one (step, layer, kind, sequence) stream."""
    key = f"{ctx.seed}/{ctx.step}/{layer}/{kind}/{sample_id}".encode()
    return (zlib.crc32(key) << 31 ^ zlib.crc32(key[::-1])) % (2**63)


def uniform(
    ctx: RoutingContext | None, layer: int, kind: str, rows: tuple[int, int, int], batch: int,
    shape: tuple[int, ...], device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """U(0, 1) draws of shape (l, B, *shape) for this rank's rows (first, count, full length L)."""
    first, count, length = rows
    if ctx is None:
        return torch.rand((count, batch, *shape), device=device)
    if len(ctx.sample_ids) != batch:
        raise ValueError(f"routing context has {len(ctx.sample_ids)} sample ids for a batch of {batch}")
    per_seq = []
    for sample_id in ctx.sample_ids:
        gen = torch.Generator(device=device).manual_seed(_stream_seed(ctx, layer, kind, sample_id))
        per_seq.append(torch.rand((length, *shape), generator=gen, device=device)[first : first + count])
    return torch.stack(per_seq, dim=1)
