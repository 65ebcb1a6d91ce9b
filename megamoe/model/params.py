"""Parameter and FLOP counts, computed from a model built on the meta device (no memory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.factory import LayerFactory


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model (per rank when built with a sharded factory)."""

    total: int
    """Every parameter."""
    active: int
    """Parameters that touch one token (dense model: all)."""
    embedding: int
    """Input-embedding parameters (a lookup, no FLOPs)."""


def count_parameters(model: nn.Module) -> ParamCounts:
    """Total, active-per-token and embedding parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embed."))
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    return ParamCounts(total=total, active=total - inactive, embedding=embedding)


def meta_counts(cfg: ModelConfig, factory: LayerFactory | None = None, moe: MoEConfig | None = None) -> ParamCounts:
    """Parameter counts of the model for cfg (one rank's share with a sharded factory), without allocating it."""
    from megamoe.model.transformer import Transformer

    with torch.device("meta"):
        return count_parameters(Transformer(cfg, factory, moe))


def flops_per_token(cfg: ModelConfig, counts: ParamCounts, moe: MoEConfig | None = None) -> float:
    """Training FLOPs per token, counted as megatron-core does.

    6 per active matmul weight (forward 2, backward 4) plus attention scores and values,
    12·layers·d_model·seq_len (the full, not causally halved, attention matrix), plus Lory's merge.
    """
    matmul = counts.active - counts.embedding - _norm_params(cfg)
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.d_model  # the embedding matrix is also the LM head
    attention = 12 * cfg.num_layers * cfg.d_model * cfg.seq_len
    return 6.0 * matmul + attention + lory_merge_flops_per_token(cfg, moe)


def lory_merge_flops_per_token(cfg: ModelConfig, moe: MoEConfig | None) -> float:
    """Lory's expert merge, 6·E·(3·D·F)/T per Lory layer: one merge of E experts per segment of T tokens.

    Relative to the merged FFN itself (6·3·D·F per token) this is E/T (§1.11).
    """
    if moe is None or moe.routing != "lory":
        return 0.0
    layers = sum(moe.is_moe_layer(i) for i in range(cfg.num_layers))
    ffn = 3 * cfg.d_model * (moe.expert_hidden_size or cfg.ffn_hidden)
    return 6.0 * layers * moe.num_experts * ffn / min(moe.segment_length, cfg.seq_len)


def _norm_params(cfg: ModelConfig) -> int:
    """RMSNorm scales: two per block and the final one."""
    return (2 * cfg.num_layers + 1) * cfg.d_model
