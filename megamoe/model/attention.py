"""Causal self-attention with grouped-query heads and rotary positions.

Shape legend: B batch, L sequence, D model width, H query heads, G key/value heads (groups),
Q query heads per group (H/G), K head width. Counts are per tensor-parallel rank; hidden states
are sequence-first.

The fused QKV projection is laid out group by group — [q_1..q_Q, k, v] for each key/value head —
so splitting its output rows contiguously over tensor-parallel ranks hands each rank whole groups.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import ModelConfig
from megamoe.model.factory import LayerFactory
from megamoe.model.layers import Rotary
from megamoe.model.moe.state import DecodeCache
from megamoe.model.recompute import maybe_checkpoint


class Attention(nn.Module):
    """Multi-head / grouped-query causal attention through scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.groups = cfg.kv_heads // factory.tp_size
        self.q_per_group = cfg.num_heads // cfg.kv_heads
        qkv_out = cfg.kv_heads * (self.q_per_group + 2) * cfg.head_dim
        self.qkv = factory.column(cfg.d_model, qkv_out, bias=cfg.qkv_bias)
        self.proj = factory.row(cfg.num_heads * cfg.head_dim, cfg.d_model)
        self.recompute_core = False
        """Selective recompute: the attention core keeps only q, k, v."""

    def forward(
        self, x_LBD: torch.Tensor, rotary: Rotary, cache: DecodeCache | None = None, index: int = 0
    ) -> torch.Tensor:
        """Causal attention over the whole sequence (under sequence parallelism the QKV projection
        gathers the sequence and the output projection scatters it again). With a decode cache the
        new tokens attend to the cached ones: a prompt into an empty cache, then one token at a time."""
        qkv_LBGXK = self.qkv(x_LBD)
        length, batch = qkv_LBGXK.shape[:2]
        qkv_LBGXK = qkv_LBGXK.view(length, batch, self.groups, self.q_per_group + 2, self.head_dim)
        q_BHLK = qkv_LBGXK[:, :, :, :-2].flatten(2, 3).permute(1, 2, 0, 3)
        k_BGLK = qkv_LBGXK[:, :, :, -2].permute(1, 2, 0, 3)
        v_BGLK = qkv_LBGXK[:, :, :, -1].permute(1, 2, 0, 3)
        offset = cache.length if cache is not None else 0
        q_BHLK, k_BGLK = rotary(q_BHLK, offset), rotary(k_BGLK, offset)
        if cache is not None:
            k_BGLK, v_BGLK = self._extend(cache, index, k_BGLK, v_BGLK, length)
        core = functools.partial(F.scaled_dot_product_attention, is_causal=offset == 0, enable_gqa=self.q_per_group > 1)
        out_BHLK = maybe_checkpoint(self.recompute_core, core, q_BHLK, k_BGLK, v_BGLK)
        return self.proj(out_BHLK.permute(2, 0, 1, 3).flatten(2))

    @staticmethod
    def _extend(cache: DecodeCache, index: int, k_BGLK, v_BGLK, length: int):
        """Append the new keys/values to the cache and return all of them."""
        if index in cache.keys:
            if length != 1:
                raise ValueError("a decode cache takes a prompt into an empty cache, then one token per step")
            k_BGLK = torch.cat([cache.keys[index], k_BGLK], dim=2)
            v_BGLK = torch.cat([cache.values[index], v_BGLK], dim=2)
        cache.keys[index], cache.values[index] = k_BGLK, v_BGLK
        return k_BGLK, v_BGLK
