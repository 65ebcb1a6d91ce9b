"""What one forward pass carries from MoE block to MoE block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.noise import RoutingContext


@dataclass
class RoutingState:
    """The routing context (layout-independent randomness) and RMoE's shared GRU with its current state."""

    ctx: RoutingContext | None = None
    gru: GRUCell | None = None
    h_TP: torch.Tensor | None = None
    """The GRU state of every routed token after the last MoE block (None before the first)."""
