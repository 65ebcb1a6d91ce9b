"""MoE under parallelism: the tensor-parallel token group and the expert-parallel all-to-all dispatcher.

Shape legend: T tokens routed by this rank, A its kept assignments, R received rows, N rows an
expert computes on (after the expert-TP gather), D width, E experts (global), e local experts.

Dispatch path (the local dispatcher plus communication):
  1. sort assignments by expert; exchange per-expert row counts with the EP peers (all_to_all_single);
  2. rows travel to their experts' EP ranks (all_to_all_single with uneven splits; autograd-aware);
  3. received rows are regrouped by local expert;
  4. with expert-TP, the ETP peers (same experts, other FFN slices) gather each other's rows;
  5. the grouped experts compute (partial sums over the FFN slice under expert-TP);
  6. expert-TP reduce-scatters the partial outputs, rows go back by all-to-all, and are combined.
Every collective runs on every rank, with zero-length splits when a rank has no rows, so a rank
that receives no tokens does not hang. Capacity (when set) is applied per source rank before step 2:
an expert can receive up to EP·C rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region

from megamoe.model.moe.dispatch import combine, sort_by_expert
from megamoe.model.moe.experts import GroupedExperts
from megamoe.model.moe.routing import Assignments
from megamoe.model.moe.tokens import TokenGroup
from megamoe.parallel.comm import all_gather_dim0, scatter_sequence, split_dim0
from megamoe.parallel.groups import Axis, ParallelGroups


class _GatherReplicated(torch.autograd.Function):
    """Forward all-gather along dim 0; backward keep this rank's slice (the output is used identically everywhere)."""

    @staticmethod
    def forward(ctx, x_lBD, group):
        ctx.group = group
        return all_gather_dim0(x_lBD, group)

    @staticmethod
    def backward(ctx, grad_LBD):
        return split_dim0(grad_LBD, ctx.group), None


class ParallelTokenGroup(TokenGroup):
    """Tokens of a micro-batch spread over the TP ranks: each routes a distinct slice of the sequence."""

    def __init__(self, tp: Axis, dp: Axis, sequence_parallel: bool):
        self.tp, self.dp, self.sp = tp, dp, sequence_parallel

    def split(self, x_LBD: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1 or self.sp:
            return x_LBD
        return scatter_sequence(x_LBD, self.tp.group)

    def merge(self, y_lBD: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1 or self.sp:
            return y_lBD
        return _GatherReplicated.apply(y_lBD, self.tp.group)

    def span(self, rows: int) -> tuple[int, int]:
        if self.tp.size == 1:
            return 0, rows
        return self.tp.rank * rows, rows * self.tp.size

    def sum_tokens(self, value: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return value
        return reduce_from_tensor_model_parallel_region(value, group=self.tp.group)

    def sum_data_parallel(self, value: torch.Tensor) -> torch.Tensor:
        if self.dp.size == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, group=self.dp.group)
        return out

    def shared_param(self, param: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return param
        return copy_to_tensor_model_parallel_region(param, group=self.tp.group)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single with uneven splits along dim 0."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows to their destination ranks; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _sizes(n: int, axis: Axis, device: torch.device) -> list[int]:
    """Row counts of every rank of an axis."""
    size = torch.tensor([n], device=device)
    return all_gather_dim0(size, axis.group).tolist()


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows`."""
    return torch.cat([x, x.new_zeros(rows - len(x), *x.shape[1:])]) if rows > len(x) else x


def _gather_uneven(x: torch.Tensor, sizes: list[int], axis: Axis) -> torch.Tensor:
    """Concatenate every rank's rows (padded to the largest, since gloo all-gathers equal sizes)."""
    full = all_gather_dim0(_pad(x, max(sizes)), axis.group)
    return torch.cat([part[:n] for part, n in zip(full.chunk(len(sizes)), sizes)])


def _reduce_scatter_uneven(x: torch.Tensor, sizes: list[int], axis: Axis) -> torch.Tensor:
    """Sum over ranks of their copy of every segment; each rank keeps its own segment."""
    rows = max(sizes)
    padded = torch.cat([_pad(seg, rows) for seg in torch.split(x, sizes)])
    out = x.new_empty((rows, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, padded.contiguous(), group=axis.group)
    return out[: sizes[axis.rank]]


class _GatherExpertTP(torch.autograd.Function):
    """Forward: the ETP peers' rows concatenated; backward: their gradients summed back per rank."""

    @staticmethod
    def forward(ctx, x, sizes, axis):
        ctx.sizes, ctx.axis = sizes, axis
        return _gather_uneven(x, sizes, axis)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_uneven(grad, ctx.sizes, ctx.axis), None, None


class _ReduceScatterExpertTP(torch.autograd.Function):
    """Forward: partial outputs summed over the ETP peers, each keeping its rows; backward: gathered."""

    @staticmethod
    def forward(ctx, y, sizes, axis):
        ctx.sizes, ctx.axis = sizes, axis
        return _reduce_scatter_uneven(y, sizes, axis)

    @staticmethod
    def backward(ctx, grad):
        return _gather_uneven(grad, ctx.sizes, ctx.axis), None, None


class AllToAllDispatcher:
    """Experts spread over EP ranks (and each expert's FFN over ETP ranks)."""

    def __init__(self, num_experts: int, groups: ParallelGroups):
        self.num_experts, self.ep, self.etp = num_experts, groups.ep, groups.etp
        self.local = num_experts // groups.ep.size

    def __call__(
        self, x_TD: torch.Tensor, assign: Assignments, experts: GroupedExperts, pad_to: int | None
    ) -> torch.Tensor:
        """Expert outputs combined per token: y_TD (fp32)."""
        s = sort_by_expert(assign)
        counts_E = torch.bincount(s.expert_A, minlength=self.num_experts)
        recv_Re = _all_to_all(counts_E, [self.local] * self.ep.size, [self.local] * self.ep.size, self.ep.group)
        recv_Re = recv_Re.view(self.ep.size, self.local)
        send, recv = counts_E.view(self.ep.size, self.local).sum(1).tolist(), recv_Re.sum(1).tolist()
        x_RD = _AllToAll.apply(x_TD[s.token_A], recv, send, self.ep.group)
        local_R = (
            torch.arange(self.local, device=x_TD.device).repeat(self.ep.size).repeat_interleave(recv_Re.reshape(-1))
        )
        y_RD = self._compute(x_RD, local_R, experts, pad_to)
        y_AD = _AllToAll.apply(y_RD, send, recv, self.ep.group)
        return combine(y_AD, s, len(x_TD))

    def _compute(self, x_RD: torch.Tensor, local_R: torch.Tensor, experts: GroupedExperts, pad_to: int | None):
        """Grouped experts on the received rows (gathered over the ETP peers first), in received order."""
        sizes = None
        if self.etp.size > 1:
            sizes = _sizes(len(x_RD), self.etp, x_RD.device)
            x_RD = _GatherExpertTP.apply(x_RD, sizes, self.etp)
            local_R = _gather_uneven(local_R, sizes, self.etp)
        order_N = torch.argsort(local_R, stable=True)
        counts_e = torch.bincount(local_R, minlength=self.local)
        rows = pad_to * self.ep.size * self.etp.size if pad_to else None
        y_ND = experts(x_RD[order_N], counts_e, rows)
        y_RD = torch.empty_like(y_ND).index_copy(0, order_N, y_ND)
        return _ReduceScatterExpertTP.apply(y_RD, sizes, self.etp) if sizes is not None else y_RD
