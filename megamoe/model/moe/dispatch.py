"""Moving tokens to their experts and the outputs back: the single-process dispatcher.

Shape legend: T tokens routed by this rank, D width, A kept assignments, E experts.
`megamoe/parallel/moe.py` has the expert-parallel twin (all-to-all); this one is its test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.model.moe.experts import GroupedExperts
from megamoe.model.moe.routing import Assignments


@dataclass
class Sorted:
    """Assignments reordered by expert (stable)."""

    token_A: torch.Tensor
    expert_A: torch.Tensor
    weight_A: torch.Tensor
    grad_scale_A: torch.Tensor | None


def sort_by_expert(assign: Assignments) -> Sorted:
    """Assignments reordered by expert, keeping token order within an expert."""
    order_A = torch.argsort(assign.expert_A, stable=True)
    scale = None if assign.grad_scale_A is None else assign.grad_scale_A[order_A]
    return Sorted(assign.token_A[order_A], assign.expert_A[order_A], assign.weight_A[order_A], scale)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a per-row scale."""

    @staticmethod
    def forward(ctx, y_AD, scale_A):
        ctx.save_for_backward(scale_A)
        return y_AD.view_as(y_AD)

    @staticmethod
    def backward(ctx, grad_AD):
        (scale_A,) = ctx.saved_tensors
        return grad_AD * scale_A[:, None].to(grad_AD.dtype), None


def combine(y_AD: torch.Tensor, s: Sorted, tokens: int) -> torch.Tensor:
    """Σ over a token's assignments of weight · expert output (at least fp32); tokens with none get 0."""
    if s.grad_scale_A is not None:
        y_AD = _ScaleGrad.apply(y_AD, s.grad_scale_A)
    dtype = torch.promote_types(y_AD.dtype, torch.float32)
    out_TD = y_AD.new_zeros(tokens, y_AD.shape[1], dtype=dtype)
    return out_TD.index_add(0, s.token_A, y_AD.to(dtype) * s.weight_A[:, None].to(dtype))


class LocalDispatcher:
    """All experts live on this rank: sort, one grouped computation, weighted scatter-add back."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(
        self, x_TD: torch.Tensor, assign: Assignments, experts: GroupedExperts, pad_to: int | None
    ) -> torch.Tensor:
        """Expert outputs combined per token: y_TD (fp32)."""
        s = sort_by_expert(assign)
        counts_E = torch.bincount(s.expert_A, minlength=self.num_experts)
        y_AD = experts(x_TD[s.token_A], counts_E, pad_to)
        return combine(y_AD, s, len(x_TD))
