"""aux_free balancing in the training loop: move every MoE block's selection bias after the optimizer step.

The loads come from the step's routing statistics (MoEMetrics), which are already summed over all
micro-batches and all-reduced over every rank (tokens are distinct across TP slices and DP/EP ranks),
so every rank applies the same update to its replicated bias without another collective.
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.model.moe import MoEFFN
from megamoe.model.moe.balance import BIAS, bias_step


def biased_blocks(model: nn.Module) -> dict[int, torch.Tensor]:
    """The bias of every MoE block that has one, by block index."""
    return {m.index: getattr(m, BIAS) for m in model.modules() if isinstance(m, MoEFFN) and hasattr(m, BIAS)}


def update_expert_biases(model: nn.Module, requested: dict[int, torch.Tensor], rate: float) -> None:
    """b += rate · sign(mean load − load) per block, from the global batch's per-expert loads."""
    for layer, bias_E in biased_blocks(model).items():
        bias_step(bias_E, requested[layer].to(bias_E.device), rate)


def bias_metrics(model: nn.Module) -> dict[str, float]:
    """moe/L<i>/bias/e<j> for every expert, and moe/L<i>/bias_range (max − min)."""
    out: dict[str, float] = {}
    for layer, bias_E in biased_blocks(model).items():
        values = bias_E.detach().double().cpu()
        out |= {f"moe/L{layer}/bias/e{e}": float(v) for e, v in enumerate(values)}
        out[f"moe/L{layer}/bias_range"] = float(values.max() - values.min())
    return out
