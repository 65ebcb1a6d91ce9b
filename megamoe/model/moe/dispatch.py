"""Moving tokens to their experts and the outputs back: the single-process dispatcher.

Shape legend: T tokens routed by this rank, D width, A kept assignments, E experts.
`megamoe/parallel/moe.py` has the expert-parallel twin (all-to-all); this one is its test oracle.
"""

from __future__ import annotations

import torch

from megamoe.model.moe.experts import GroupedExperts
from megamoe.model.moe.routing import Assignments


def sort_by_expert(assign: Assignments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignments reordered by expert (stable): (token, expert, weight)."""
    order_A = torch.argsort(assign.expert_A, stable=True)
    return assign.token_A[order_A], assign.expert_A[order_A], assign.weight_A[order_A]


def combine(y_AD: torch.Tensor, token_A: torch.Tensor, weight_A: torch.Tensor, tokens: int) -> torch.Tensor:
    """Σ over a token's assignments of weight · expert output (fp32); tokens with none get 0."""
    out_TD = y_AD.new_zeros(tokens, y_AD.shape[1], dtype=torch.float32)
    return out_TD.index_add(0, token_A, y_AD.float() * weight_A[:, None])


class LocalDispatcher:
    """All experts live on this rank: sort, one grouped computation, weighted scatter-add back."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(
        self, x_TD: torch.Tensor, assign: Assignments, experts: GroupedExperts, pad_to: int | None
    ) -> torch.Tensor:
        """Expert outputs combined per token: y_TD (fp32)."""
        token_A, expert_A, weight_A = sort_by_expert(assign)
        counts_E = torch.bincount(expert_A, minlength=self.num_experts)
        y_AD = experts(x_TD[token_A], counts_E, pad_to)
        return combine(y_AD, token_A, weight_A, len(x_TD))
