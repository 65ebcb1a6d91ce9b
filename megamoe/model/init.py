"""Megatron-style initialization that does not depend on the parallel layout.

Every weight is drawn N(0, init_std) — residual output projections N(0, init_std/√(2·layers)) —
from a generator seeded by (seed, parameter name). A sharded parameter carries a `shards`
attribute, one (mesh axis, dim, rank, world) per axis it is split over: the full tensor is drawn
and the rank keeps its slice, so each layout holds exactly the single-process weights. Norm
scales start at 1, biases at 0 — except RMoE's GRU biases, at moe.gru_bias_init (0 by default).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from megamoe.config import ModelConfig

RESIDUAL_OUTPUTS = ("attn.proj.weight", "down.weight", "experts.w_down")
"""Parameter-name suffixes of the projections that write into the residual stream."""
GRU_BIASES = ("router_gru.bias_ih", "router_gru.bias_hh")
"""RMoE's shared GRU biases: they start at moe.gru_bias_init."""


def param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one named parameter."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_std_for(name: str, cfg: ModelConfig) -> float:
    """The init std of the parameter called name."""
    if name.endswith(RESIDUAL_OUTPUTS):
        return cfg.init_std / math.sqrt(2 * cfg.num_layers)
    return cfg.init_std


def is_bias(name: str) -> bool:
    """A bias: `*.bias`, or the GRU's `bias_ih` / `bias_hh` (which once fell through to the norm scales' 1)."""
    return name.rsplit(".", 1)[-1].startswith("bias")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the unsharded tensor of which param is one rank's slice."""
    shape = list(param.shape)
    for _, dim, _, world in getattr(param, "shards", ()):
        shape[dim] *= world
    return tuple(shape)


def initial_value(name: str, param: torch.Tensor, cfg: ModelConfig, seed: int, gru_bias: float = 0.0) -> torch.Tensor:
    """This rank's slice of the initial value of the parameter called name (on the CPU); gru_bias: moe.gru_bias_init."""
    if is_bias(name):
        return torch.full(param.shape, gru_bias if name in GRU_BIASES else 0.0)
    if param.ndim == 1:
        return torch.ones(param.shape)
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    full = torch.normal(0.0, init_std_for(name, cfg), full_shape(param), generator=gen)
    for _, dim, rank, world in getattr(param, "shards", ()):
        full = full.chunk(world, dim=dim)[rank]
    return full


@torch.no_grad()
def init_parameters(model: nn.Module, cfg: ModelConfig, seed: int, gru_bias: float = 0.0) -> None:
    """Initialize every parameter of model in place (norm scales → 1, weights → seeded normal)."""
    for name, param in model.named_parameters():
        if not param.is_meta:
            param.copy_(initial_value(name, param, cfg, seed, gru_bias))
