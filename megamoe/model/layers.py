"""Normalization, rotary position embedding and the dense SwiGLU FFN.

Shape legend: B batch, L sequence, D model width, H heads, K head width, F FFN width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from megamoe.model.factory import LayerFactory


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned per-channel scale, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def scale(self) -> torch.Tensor:
        """The per-channel scale as used in forward (the sequence-parallel norm all-reduces its grad)."""
        return self.weight

    def forward(self, x_LBD: torch.Tensor) -> torch.Tensor:
        """x / rms(x) · weight."""
        x32_LBD = x_LBD.float()
        normed_LBD = x32_LBD * torch.rsqrt(x32_LBD.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed_LBD * self.scale().float()).to(x_LBD.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) with cos/sin tables for max_len positions."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_LK = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq).repeat(1, 2)
        self.register_buffer("cos_LK", angles_LK.cos().float(), persistent=False)
        self.register_buffer("sin_LK", angles_LK.sin().float(), persistent=False)

    def forward(self, x_BHLK: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate queries or keys at positions offset .. offset+L-1."""
        length = x_BHLK.shape[-2]
        cos_LK = self.cos_LK[offset : offset + length].to(x_BHLK.dtype)
        sin_LK = self.sin_LK[offset : offset + length].to(x_BHLK.dtype)
        x1, x2 = x_BHLK.chunk(2, dim=-1)
        rotated_BHLK = torch.cat((-x2, x1), dim=-1)
        return x_BHLK * cos_LK + rotated_BHLK * sin_LK


class SwiGLU(nn.Module):
    """Dense FFN: down(SiLU(gate(x)) ⊙ up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, dim: int, hidden: int, factory: LayerFactory):
        super().__init__()
        self.gate = factory.column(dim, hidden)
        self.up = factory.column(dim, hidden)
        self.down = factory.row(hidden, dim)

    def forward(self, x_LBD: torch.Tensor) -> torch.Tensor:
        """SwiGLU of x."""
        return self.down(F.silu(self.gate(x_LBD)) * self.up(x_LBD))
