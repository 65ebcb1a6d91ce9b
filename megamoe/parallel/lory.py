"""Lory under parallelism: expert-wise model parallelism over EP, whole sequences per TP rank.

Shape legend: L sequence, B micro-batch, b = B/tp sequences per TP rank, S segments, T segment
length, D width, E experts.

- Every expert is split along its FFN width F over the EP ranks. The paper calls this
  "expert-wise model parallelism": a rank holds the same F slice of every expert, so it merges
  its slice of the weights locally, with no communication.
- The EP ranks gather each other's segments and routing weights. Each computes the partial SwiGLU
  of its F slice for all of them, and one reduce-scatter sums the down projections and hands every
  rank its own segments back.
- Segments need whole sequences, so inside a Lory block the TP ranks take distinct sequences of
  the micro-batch (the sequence is gathered first under sequence parallelism), then restore the
  block's layout. The router, replicated over TP but used on distinct sequences, gets its gradient
  summed over TP.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from megamoe.model.moe.lory import LoryComm
from megamoe.parallel.comm import all_gather_dim0, gather_sequence, reduce_scatter_sequence, scatter_sequence
from megamoe.parallel.groups import Axis


def _gather_dim1(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 1 (the batch)."""
    return all_gather_dim0(x.transpose(0, 1).contiguous(), axis.group).transpose(0, 1)


def _slice_dim1(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """This rank's share of dim 1."""
    return x.chunk(axis.size, dim=1)[axis.rank].contiguous()


class _SplitBatch(torch.autograd.Function):
    """Forward: this rank's sequences. Backward: all-gather (input replicated) or zero-pad (input gathered)."""

    @staticmethod
    def forward(ctx, x_LBD, axis, replicated_input):
        ctx.axis, ctx.replicated, ctx.batch = axis, replicated_input, x_LBD.shape[1]
        return _slice_dim1(x_LBD, axis)

    @staticmethod
    def backward(ctx, grad_LbD):
        if ctx.replicated:
            return _gather_dim1(grad_LbD, ctx.axis), None, None
        full = grad_LbD.new_zeros(grad_LbD.shape[0], ctx.batch, *grad_LbD.shape[2:])
        share = ctx.batch // ctx.axis.size
        full[:, ctx.axis.rank * share : (ctx.axis.rank + 1) * share] = grad_LbD
        return full, None, None


class _GatherBatch(torch.autograd.Function):
    """Forward: every TP rank's sequences (the output is used identically everywhere). Backward: own share."""

    @staticmethod
    def forward(ctx, y_LbD, axis):
        ctx.axis = axis
        return _gather_dim1(y_LbD, axis)

    @staticmethod
    def backward(ctx, grad_LBD):
        return _slice_dim1(grad_LBD, ctx.axis), None


class ParallelLoryComm(LoryComm):
    """Lory's tokens over TP (distinct sequences per rank) and its experts over EP (F slices)."""

    def __init__(self, tp: Axis, ep: Axis, sequence_parallel: bool):
        self.tp, self.ep, self.sp = tp, ep, sequence_parallel

    def split(self, x_LBD: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return x_LBD
        if self.sp:
            return _SplitBatch.apply(gather_sequence(x_LBD, self.tp.group), self.tp, False)
        return _SplitBatch.apply(x_LBD, self.tp, True)

    def merge(self, y_LbD: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return y_LbD
        y_LBD = _GatherBatch.apply(y_LbD, self.tp)
        return scatter_sequence(y_LBD, self.tp.group) if self.sp else y_LBD

    def gather(self, x_STD: torch.Tensor, w_SE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ep.size == 1:
            return x_STD, w_SE
        return gather_sequence(x_STD, self.ep.group), gather_sequence(w_SE, self.ep.group)

    def reduce(self, y_STD: torch.Tensor) -> torch.Tensor:
        return y_STD if self.ep.size == 1 else reduce_scatter_sequence(y_STD, self.ep.group)

    def shared_param(self, param: torch.Tensor) -> torch.Tensor:
        return param if self.tp.size == 1 else copy_to_tensor_model_parallel_region(param, group=self.tp.group)

    @torch.no_grad()
    def full_batch(self, w_NbE: torch.Tensor) -> torch.Tensor:
        return w_NbE if self.tp.size == 1 else _gather_dim1(w_NbE, self.tp)
