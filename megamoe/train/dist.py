"""Small collectives the trainer needs; each is a no-op (or identity) in a single process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from megamoe.errors import MegamoeError
from megamoe.parallel.groups import Axis

T = TypeVar("T")


def is_main() -> bool:
    """This process is rank 0 (or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


def from_main(value: object) -> object:
    """Rank 0's value (a picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """fn() on rank 0 only (None elsewhere); a MegamoeError it raises is raised on every rank.

    Without this the other ranks would wait for rank 0 in their next collective and die there with
    a connection error, burying rank 0's one-line message under their tracebacks.
    """
    if not dist.is_initialized():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except MegamoeError as err:
            error = err
    failure = from_main(None if error is None else (str(error), error.exit_status))
    if failure is None:
        return result
    if error is not None:
        error.same_on_every_rank = True
        raise error
    shared = MegamoeError(failure[0])
    shared.exit_status, shared.same_on_every_rank = failure[1], True
    raise shared


def mean_over(value: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Average of a tensor over the ranks of one axis."""
    if axis.size == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, group=axis.group)
    return out / axis.size


def sum_over(value: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Sum of a tensor over the ranks of one axis."""
    if axis.size == 1:
        return value
    out = value.clone()
    dist.all_reduce(out, group=axis.group)
    return out


def gather(value: object) -> list:
    """Every rank's (picklable) value, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank (preemption must stop all ranks at one step)."""
    if not dist.is_initialized():
        return flag
    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())
