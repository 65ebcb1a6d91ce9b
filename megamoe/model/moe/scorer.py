"""Router logits: a linear layer d → E, or RMoE's projector d → p → shared GRU → router p → E.

Shape legend: T routed items (tokens, or Lory's segment means), D width, P GRU state width, E experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.model.moe.state import RoutingState


class Scorer(nn.Module):
    """The router of one MoE layer (the GRU itself is shared and travels in the RoutingState)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        gru = cfg.scorer == "gru"
        self.proj = nn.Linear(dim, cfg.gru_hidden, bias=False) if gru else None
        self.router = nn.Linear(cfg.gru_hidden if gru else dim, cfg.num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor, state: RoutingState, param: Callable = lambda p: p) -> torch.Tensor:
        """Logits (fp32 unless moe.router_fp32 is off); a GRU scorer advances state.h_TP."""
        fp32 = self.cfg.router_fp32
        precision = torch.autocast(x_TD.device.type, enabled=False) if fp32 else contextlib.nullcontext()
        with precision:
            x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32)) if fp32 else x_TD
            if self.proj is not None:
                x_TD = self._gru_step(F.linear(x_TD, param(self.proj.weight).to(x_TD.dtype)), state, param)
            return F.linear(x_TD, param(self.router.weight).to(x_TD.dtype))

    def _gru_step(self, x_TP: torch.Tensor, state: RoutingState, param: Callable) -> torch.Tensor:
        """RMoE: the shared GRU from the previous MoE layer's state (zero at the first); updates the state."""
        cfg = self.cfg
        h_TP = state.h_TP if state.h_TP is not None and not cfg.gru_no_passing else torch.zeros_like(x_TP)
        if cfg.gru_detach_state:
            h_TP = h_TP.detach()
        state.h_TP = state.gru(x_TP, h_TP.to(x_TP.dtype), param)
        return state.h_TP
