"""Per-step routing statistics of one MoE layer (no gradients), summed over micro-batches and ranks.

Shape legend: E experts, P position buckets (quarters of the sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megamoe.model.moe.routing import Assignments

POSITION_BUCKETS = 4


@dataclass
class RoutingStats:
    """Sums: tokens per expert, drops by position bucket, router entropy."""

    load_E: torch.Tensor
    """Kept assignments per expert."""
    requested_E: torch.Tensor
    """Requested assignments per expert (before capacity)."""
    tokens_P: torch.Tensor
    """Tokens per position bucket."""
    dropped_any_P: torch.Tensor
    """Tokens with at least one dropped choice, per position bucket."""
    dropped_first_P: torch.Tensor
    """Tokens whose first choice was dropped, per position bucket."""
    entropy: torch.Tensor
    """Σ over tokens of the router's score entropy (nats)."""
    active_E: torch.Tensor
    """Tokens (Lory: segments with weight > 2/E) each expert was active for."""

    def to_vector(self) -> torch.Tensor:
        """All fields as one fp64 vector (one all-reduce)."""
        return torch.cat([getattr(self, f.name).double().reshape(-1).cpu() for f in fields(self)])

    @staticmethod
    def _sizes(num_experts: int) -> list[int]:
        """Lengths of the fields in to_vector's order."""
        return [num_experts, num_experts, POSITION_BUCKETS, POSITION_BUCKETS, POSITION_BUCKETS, 1, num_experts]

    @classmethod
    def vector_size(cls, num_experts: int) -> int:
        """Length of to_vector's result."""
        return sum(cls._sizes(num_experts))

    @classmethod
    def from_vector(cls, vec: torch.Tensor, num_experts: int) -> RoutingStats:
        """Inverse of to_vector."""
        parts = torch.split(vec, cls._sizes(num_experts))
        return cls(*parts[:5], parts[5].reshape(()), parts[6])


@torch.no_grad()
def routing_stats(logits_TE: torch.Tensor, assign: Assignments, position_T: torch.Tensor, seq_len: int) -> RoutingStats:
    """Statistics of one forward's routing (position_T: each token's position in its sequence)."""
    num_experts = logits_TE.shape[1]
    bucket_T = (position_T * POSITION_BUCKETS // seq_len).clamp(max=POSITION_BUCKETS - 1)
    load_E = torch.bincount(assign.expert_A, minlength=num_experts).double()
    if assign.requested_TK is not None:
        requested_E = torch.bincount(assign.requested_TK.reshape(-1), minlength=num_experts).double()
        dropped_any_T, dropped_first_T = ~assign.kept_TK.all(-1), ~assign.kept_TK[:, 0]
    else:  # expert choice: nothing is requested or dropped; a token no expert picked counts as dropped
        requested_E = load_E
        dropped_any_T = torch.ones_like(bucket_T, dtype=torch.bool).index_fill(0, assign.token_A, False)
        dropped_first_T = dropped_any_T
    probs_TE = logits_TE.float().softmax(-1)
    entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum()
    per_bucket = lambda mask: torch.bincount(bucket_T[mask], minlength=POSITION_BUCKETS).double()  # noqa: E731
    all_T = torch.ones_like(bucket_T, dtype=torch.bool)
    return RoutingStats(
        load_E, requested_E, per_bucket(all_T), per_bucket(dropped_any_T), per_bucket(dropped_first_T),
        entropy.double(), load_E,
    )  # fmt: skip
