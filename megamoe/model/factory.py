"""The layer factory: how the model gets its linears, embedding, LM head and loss.

Shape legend: B batch, L sequence, D model width, V vocabulary, I/O in/out features.
Hidden states are sequence-first (L, B, D), Megatron's layout, so sequence parallelism can split
them along dim 0. The default factory builds plain single-device torch layers; `megamoe/parallel`
supplies a subclass whose layers are megatron-core's tensor-parallel ones, so the same model code
runs on every layout. Every module keeps its parameter named `weight`, so checkpoints of all
layouts share one set of names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.layers import RMSNorm
from megamoe.model.moe.dispatch import LocalDispatcher
from megamoe.model.moe.experts import GroupedExperts
from megamoe.model.moe.tokens import TokenGroup
from megamoe.ops.linear_ce import linear_cross_entropy


class SeqFirstEmbedding(nn.Embedding):
    """Token embedding: tokens_BL → h_LBD."""

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Look up the transposed token ids."""
        return super().forward(tokens_BL.t())


class Head(nn.Linear):
    """Untied LM head: h_LBD → logits_LBV (the weight argument is ignored)."""

    def forward(self, h_LBD: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Project to the vocabulary."""
        return super().forward(h_LBD)


class TiedHead(nn.Module):
    """LM head that reuses the input embedding matrix; it owns no parameters."""

    def forward(self, h_LBD: torch.Tensor, weight_VD: torch.Tensor | None = None) -> torch.Tensor:
        """Project through the embedding matrix."""
        assert weight_VD is not None, "a tied head needs the embedding weight"
        return F.linear(h_LBD, weight_VD)


@dataclass(frozen=True)
class LayerFactory:
    """Builds the model's layers; subclasses shard them over tensor-parallel ranks."""

    tp_size: int = 1
    """Ranks each column/row linear is split over (the model divides head counts by it)."""

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """Linear whose output features (and bias) are split over TP ranks: x_LBI → y_LB(O/tp)."""
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        """Linear whose input features are split over TP ranks and outputs summed: x_LB(I/tp) → y_LBO."""
        return nn.Linear(in_features, out_features, bias=False)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        """Token embedding tokens_BL → h_LBD (rows split over TP ranks in the parallel factory)."""
        return SeqFirstEmbedding(vocab_size, dim)

    def lm_head(self, dim: int, vocab_size: int, tied: bool) -> nn.Module:
        """Output projection h_LBD → (vocab-parallel) logits_LBV; tied heads take the embedding weight."""
        return TiedHead() if tied else Head(dim, vocab_size, bias=False)

    def norm(self, dim: int, eps: float) -> nn.Module:
        """RMSNorm over the last dim (its weight gradient is summed over TP ranks under sequence parallelism)."""
        return RMSNorm(dim, eps)

    def experts(self, num_experts: int, dim: int, hidden: int) -> nn.Module:
        """This rank's grouped SwiGLU experts (all of them in a single process)."""
        return GroupedExperts(num_experts, dim, hidden)

    def lory_experts(self, num_experts: int, dim: int, hidden: int) -> nn.Module:
        """Lory's experts (each split along F over the expert-parallel ranks in the parallel factory)."""
        from megamoe.model.moe.lory import LoryExperts

        return LoryExperts(num_experts, dim, hidden)

    def lory_comm(self):
        """Lory's view of its tokens and of the ranks sharing its experts' F dimension."""
        from megamoe.model.moe.lory import LoryComm

        return LoryComm()

    def dispatcher(self, num_experts: int):
        """Moves routed tokens to their experts and back (all-to-all under expert parallelism)."""
        return LocalDispatcher(num_experts)

    def token_group(self) -> TokenGroup:
        """The tokens a MoE block routes, and sums over the ranks holding the rest of the micro-batch."""
        return TokenGroup()

    def head_loss(
        self, head: nn.Module, hn_LBD: torch.Tensor, tied_VD: torch.Tensor | None, targets_BL: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        """The LM head fused with token_loss, `chunk` tokens at a time (no logits are kept) → loss_BL."""
        w_VD = head.weight if tied_VD is None else tied_VD
        h_LBD, group, vocab_start = self.head_region(hn_LBD, w_VD)
        loss_N = linear_cross_entropy(h_LBD.flatten(0, 1), w_VD, targets_BL.t().flatten(), chunk, group, vocab_start)
        return loss_N.view(h_LBD.shape[:2]).t()

    def head_region(self, hn_LBD: torch.Tensor, w_VD: torch.Tensor) -> tuple[torch.Tensor, object, int]:
        """The head's input as its matmul sees it, the group its vocabulary is split over, and this rank's first row."""
        return hn_LBD, None, 0

    def token_loss(self, logits_LBV: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy in fp32 over the (possibly vocab-parallel) logits → loss_BL."""
        targets_LB = targets_BL.t()
        loss = F.cross_entropy(logits_LBV.float().flatten(0, 1), targets_LB.flatten(), reduction="none")
        return loss.view_as(targets_LB).t()
