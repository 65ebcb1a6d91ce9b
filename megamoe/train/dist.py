"""Small collectives the trainer needs; each is a no-op (or identity) in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.groups import Axis


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


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank (preemption must stop all ranks at one step)."""
    if not dist.is_initialized():
        return flag
    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())
