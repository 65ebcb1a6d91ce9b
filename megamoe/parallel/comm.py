"""Device-agnostic collectives along the sequence dimension (dim 0) for sequence parallelism.

megatron-core's own sequence-parallel mappings allocate their buffers with
torch.cuda.current_device(), so they cannot run on CPU/gloo; these do the same math on any device.
Shape legend: L sequence (full), S = L / tp (this rank's slice), * the other dims.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_dim0(x_S: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's slice along dim 0: x_S* → x_L*."""
    world = dist.get_world_size(group)
    out_L = torch.empty((world * x_S.shape[0], *x_S.shape[1:]), dtype=x_S.dtype, device=x_S.device)
    _all_gather(out_L, x_S.contiguous(), group=group)
    return out_L


def reduce_scatter_dim0(x_L: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ranks, each keeping its slice of dim 0: x_L* → x_S*."""
    world = dist.get_world_size(group)
    out_S = torch.empty((x_L.shape[0] // world, *x_L.shape[1:]), dtype=x_L.dtype, device=x_L.device)
    _reduce_scatter(out_S, x_L.contiguous(), group=group)
    return out_S


def split_dim0(x_L: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of dim 0 (no communication)."""
    return x_L.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()


class _GatherSequence(torch.autograd.Function):
    """Forward all-gather along the sequence; backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x_S, group):
        ctx.group = group
        return all_gather_dim0(x_S, group)

    @staticmethod
    def backward(ctx, grad_L):
        return reduce_scatter_dim0(grad_L, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward reduce-scatter along the sequence; backward all-gather."""

    @staticmethod
    def forward(ctx, x_L, group):
        ctx.group = group
        return reduce_scatter_dim0(x_L, group)

    @staticmethod
    def backward(ctx, grad_S):
        return all_gather_dim0(grad_S, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    """Forward keep this rank's slice; backward all-gather."""

    @staticmethod
    def forward(ctx, x_L, group):
        ctx.group = group
        return split_dim0(x_L, group)

    @staticmethod
    def backward(ctx, grad_S):
        return all_gather_dim0(grad_S, ctx.group), None


def gather_sequence(x_SBD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sequence-parallel region → full sequence (before a column-parallel linear)."""
    return _GatherSequence.apply(x_SBD, group)


def reduce_scatter_sequence(x_LBD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Partial sums over TP ranks → summed sequence slice (after a row-parallel linear)."""
    return _ReduceScatterSequence.apply(x_LBD, group)


def scatter_sequence(x_LBD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Replicated full sequence → this rank's slice (after the embedding)."""
    return _ScatterSequence.apply(x_LBD, group)
