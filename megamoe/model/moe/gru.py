"""RMoE's GRU cell (PyTorch GRUCell convention), shared by every MoE layer's router.

Shape legend: T tokens, P state width.
  r = σ(W_ir x + b_ir + W_hr h + b_hr)
  z = σ(W_iz x + b_iz + W_hz h + b_hz)
  n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
  h' = (1 − z) ⊙ n + z ⊙ h
Weights are stacked (r, z, n) like torch.nn.GRUCell's weight_ih / weight_hh, so its parameters
load into one directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GRUCell(nn.Module):
    """A GRU cell of input and state width P."""

    def __init__(self, size: int, bias_init: float = 0.0):
        """bias_init: moe.gru_bias_init (build_model's init_parameters sets the same value)."""
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(3 * size, size))
        self.weight_hh = nn.Parameter(torch.empty(3 * size, size))
        self.bias_ih = nn.Parameter(torch.full((3 * size,), bias_init))
        self.bias_hh = nn.Parameter(torch.full((3 * size,), bias_init))

    def forward(self, x_TP: torch.Tensor, h_TP: torch.Tensor, param: Callable = lambda p: p) -> torch.Tensor:
        """The next state; `param` wraps each parameter (tensor parallelism sums its grad over the TP ranks)."""
        update_TP, candidate_TP = self.gates(x_TP, h_TP, param)
        return (1 - update_TP) * candidate_TP + update_TP * h_TP

    def gates(
        self, x_TP: torch.Tensor, h_TP: torch.Tensor, param: Callable = lambda p: p
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(update gate z, candidate n) of one step."""
        gi_r, gi_z, gi_n = F.linear(x_TP, param(self.weight_ih), param(self.bias_ih)).chunk(3, -1)
        gh_r, gh_z, gh_n = F.linear(h_TP, param(self.weight_hh), param(self.bias_hh)).chunk(3, -1)
        reset, update = torch.sigmoid(gi_r + gh_r), torch.sigmoid(gi_z + gh_z)
        return update, torch.tanh(gi_n + reset * gh_n)
