"""Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2): the per-expert selection bias.

Shape legend: E experts.
Each token-choice MoE block with moe.balance=aux_free holds a bias b_E (a buffer, not a parameter:
no gradient, no optimizer, no weight decay). It is added to the scores for the top-k selection
only; the combine weights use the unbiased scores. After every optimizer step the trainer applies

    b_i += γ · sign(mean_j load_j − load_i)

with load_i the tokens that chose expert i (before capacity) over the whole global batch: every
micro-batch of the step on every data-parallel rank, so the update is the same on every layout.
"""

from __future__ import annotations

import torch
from torch import nn

BIAS = "expert_bias"
"""Name of the bias buffer in a MoE block (checkpointed as model state)."""


@torch.no_grad()
def bias_step(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """b += rate · sign(mean load − load), in place (load: tokens per expert over the global batch)."""
    load_E = load_E.to(torch.float64)
    bias_E += (rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype)


def expert_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every MoE block's bias by its state-dict name (empty unless moe.balance=aux_free)."""
    return {name: buf for name, buf in model.named_buffers() if name.rsplit(".", 1)[-1] == BIAS}
