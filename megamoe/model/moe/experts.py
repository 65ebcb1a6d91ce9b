"""Grouped SwiGLU experts: every local expert's three matrices applied in one batched op each.

Shape legend: E experts (this rank's), N tokens sorted by expert, D width, F expert FFN width
(this rank's slice under expert-tensor parallelism).
Weights are stored stacked per expert, [E, out, in] like nn.Linear: w_gate, w_up (E, F, D) and
w_down (E, D, F). Under expert parallelism a rank holds a contiguous block of experts (dim 0);
under expert-tensor parallelism each expert's F is split (dim 1 of gate/up, dim 2 of down). Both
are recorded in `param.shards`, so init and checkpoints see the full (E, ·, ·) tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.recompute import maybe_checkpoint
from megamoe.ops import grouped_linear


def mark_shards(param: nn.Parameter, *shards: tuple[str, int, int, int]) -> None:
    """Record (mesh axis, tensor dim, rank, world) for every axis the parameter is split over."""
    param.shards = tuple(s for s in shards if s[3] > 1) or getattr(param, "shards", ())


class GroupedExperts(nn.Module):
    """This rank's SwiGLU experts (E_local = E / ep, F_local = F / etp)."""

    def __init__(
        self, num_experts: int, dim: int, hidden: int, ep: tuple[int, int] = (0, 1), etp: tuple[int, int] = (0, 1)
    ):
        super().__init__()
        (ep_rank, ep_size), (etp_rank, etp_size) = ep, etp
        local, width = num_experts // ep_size, hidden // etp_size
        self.first_expert = ep_rank * local
        self.w_gate = nn.Parameter(torch.empty(local, width, dim))
        self.w_up = nn.Parameter(torch.empty(local, width, dim))
        self.w_down = nn.Parameter(torch.empty(local, dim, width))
        for param, f_dim in ((self.w_gate, 1), (self.w_up, 1), (self.w_down, 2)):
            mark_shards(param, ("ep", 0, ep_rank, ep_size), ("etp", f_dim, etp_rank, etp_size))
            param.expert = True
        self.recompute_core = False
        """Selective recompute: keep only the experts' input rows, recompute gate, up and SiLU in backward."""

    @property
    def num_local(self) -> int:
        """Experts held by this rank."""
        return self.w_gate.shape[0]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, rows_per_expert: int | None = None) -> torch.Tensor:
        """SwiGLU of each expert's rows (a partial sum over F slices under expert-tensor parallelism)."""
        return maybe_checkpoint(self.recompute_core, self._swiglu, x_ND, counts_E, rows_per_expert)

    def _swiglu(self, x_ND: torch.Tensor, counts_E: torch.Tensor, rows_per_expert: int | None) -> torch.Tensor:
        """The three grouped matmuls."""
        gate_NF = grouped_linear(x_ND, self.w_gate, counts_E, rows_per_expert)
        up_NF = grouped_linear(x_ND, self.w_up, counts_E, rows_per_expert)
        return grouped_linear(F.silu(gate_NF) * up_NF, self.w_down, counts_E, rows_per_expert)
