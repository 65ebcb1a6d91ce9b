"""What one forward pass carries from MoE block to MoE block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.noise import RoutingContext


@dataclass
class DecodeCache:
    """What incremental decoding keeps between forward calls."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per block: cached keys, (B, G, L, K)."""
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per block: cached values, (B, G, L, K)."""
    lory: dict = field(default_factory=dict)
    """Per Lory block: its LoryDecode routing state."""
    length: int = 0
    """Tokens already cached (the position of the next token)."""


@dataclass
class RoutingState:
    """The routing context (layout-independent randomness) and RMoE's shared GRU with its current state."""

    ctx: RoutingContext | None = None
    gru: GRUCell | None = None
    h_TP: torch.Tensor | None = None
    """The GRU state of every routed token after the last MoE block (None before the first)."""
    cache: DecodeCache | None = None
    """Incremental decoding: key/value caches and Lory's fixed routing (None in training and eval)."""
