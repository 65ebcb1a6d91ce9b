"""The decoder-only transformer (LLaMA-style): pre-norm blocks of attention and FFN.

Shape legend: B batch, L sequence, D model width, V vocabulary (per tensor-parallel rank for logits).
Token ids and losses are batch-first (B, L); hidden states are sequence-first (L, B, D).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.attention import Attention
from megamoe.model.factory import LayerFactory
from megamoe.model.init import init_parameters
from megamoe.model.layers import Rotary, SwiGLU
from megamoe.model.moe import MoEFFN, MoELayerOutput
from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.lory import LoryFFN
from megamoe.model.moe.noise import RoutingContext
from megamoe.model.moe.state import DecodeCache, RoutingState
from megamoe.model.recompute import checkpointed_block


@dataclass
class ModelOutput:
    """What a forward pass returns."""

    logits_BLV: torch.Tensor | None
    """Logits (the local vocabulary shard under tensor parallelism); None where the loss was fused with the head."""
    token_loss_BL: torch.Tensor | None = None
    """Per-token next-token cross-entropy in fp32, when targets were given."""
    aux_loss: torch.Tensor | float = 0.0
    """Sum of every MoE layer's auxiliary losses (already scaled by their coefficients)."""
    moe: dict[int, MoELayerOutput] = field(default_factory=dict)
    """Per MoE layer (by block index): its losses and routing statistics."""

    @property
    def loss(self) -> torch.Tensor:
        """Mean cross-entropy over all tokens."""
        assert self.token_loss_BL is not None, "forward was called without targets"
        return self.token_loss_BL.mean()


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)) with a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, factory: LayerFactory, index: int):
        super().__init__()
        self.attn_norm = factory.norm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, factory)
        self.ffn_norm = factory.norm(cfg.d_model, cfg.norm_eps)
        self.index, self.is_moe = index, moe.is_moe_layer(index)
        block = LoryFFN if moe.routing == "lory" else MoEFFN
        self.ffn = block(cfg, moe, factory, index) if self.is_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden, factory)

    def forward(
        self, x_LBD: torch.Tensor, rotary: Rotary, state: RoutingState
    ) -> tuple[torch.Tensor, MoELayerOutput | None]:
        """One block; MoE blocks also return their losses and statistics (and advance the routing state)."""
        x_LBD = x_LBD + self.attn(self.attn_norm(x_LBD), rotary, state.cache, self.index)
        if self.is_moe:
            y_LBD, aux = self.ffn(self.ffn_norm(x_LBD), state)
            return x_LBD + y_LBD, aux
        return x_LBD + self.ffn(self.ffn_norm(x_LBD)), None


@dataclass(frozen=True)
class Part:
    """What a pipeline rank builds of the model: its blocks, and the embedding and/or final norm and head."""

    blocks: frozenset[int]
    embed: bool
    head: bool


class Transformer(nn.Module):
    """Embedding → blocks → final norm → LM head (optionally tied to the embedding)."""

    def __init__(
        self,
        cfg: ModelConfig,
        factory: LayerFactory | None = None,
        moe: MoEConfig | None = None,
        part: Part | None = None,
    ):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg, self.moe_cfg = cfg, moe or MoEConfig()
        self.factory = factory or LayerFactory()
        part = part or Part(frozenset(range(cfg.num_layers)), embed=True, head=True)
        self.embed = self.factory.embedding(cfg.vocab_size, cfg.d_model) if part.embed else None
        self.layers = nn.ModuleList(
            Block(cfg, self.moe_cfg, self.factory, i) if i in part.blocks else nn.Identity()
            for i in range(cfg.num_layers)
        )
        gru = self.moe_cfg.enabled and self.moe_cfg.scorer == "gru"
        self.router_gru = GRUCell(self.moe_cfg.gru_hidden, self.moe_cfg.gru_bias_init) if gru else None
        self.norm = self.factory.norm(cfg.d_model, cfg.norm_eps) if part.head else None
        self.lm_head = self.factory.lm_head(cfg.d_model, cfg.vocab_size, tied=cfg.tie_embeddings) if part.head else None
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.recompute_blocks = False
        """Full activation recompute (train.recompute=full): blocks keep only their input."""
        self.loss_chunk_tokens = 0
        """train.loss_chunk_tokens: > 0 fuses the head with the loss, that many tokens at a time (no logits)."""

    def forward(
        self,
        tokens_BL: torch.Tensor,
        targets_BL: torch.Tensor | None = None,
        ctx: RoutingContext | None = None,
        cache: DecodeCache | None = None,
    ) -> ModelOutput:
        """Logits for every position, and per-token losses when targets are given.

        ctx (seed, step, sample ids) makes stochastic routing draws independent of the layout;
        cache turns on incremental decoding (keys/values and Lory's routing are kept in it).
        """
        h_LBD = self.embed(tokens_BL)
        state = RoutingState(ctx, self.router_gru, cache=cache)
        h_LBD, moe = self.run_blocks(h_LBD, state, range(len(self.layers)))
        if self.fuses_loss(targets_BL, cache):
            logits_BLV, token_loss_BL = None, self.head_loss(self.norm(h_LBD), targets_BL)
        else:
            logits_LBV = self.lm_head(self.norm(h_LBD), self.tied_weight)
            token_loss_BL = None if targets_BL is None else self.factory.token_loss(logits_LBV, targets_BL)
            logits_BLV = logits_LBV.transpose(0, 1)
        if cache is not None:
            cache.length += tokens_BL.shape[1]
        aux_loss = sum(
            (loss for out in moe.values() for loss in out.losses.values()), torch.zeros((), device=h_LBD.device)
        )
        return ModelOutput(logits_BLV, token_loss_BL, aux_loss, moe)

    @property
    def tied_weight(self) -> torch.Tensor | None:
        """The embedding matrix the head reuses (tied embeddings), else None."""
        return self.embed.weight if self.cfg.tie_embeddings else None

    def fuses_loss(self, targets_BL: torch.Tensor | None, cache: DecodeCache | None = None) -> bool:
        """Whether this forward computes its loss fused with the head (train.loss_chunk_tokens; not decoding)."""
        return self.loss_chunk_tokens > 0 and targets_BL is not None and cache is None

    def head_loss(self, hn_LBD: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        """Per-token losses of the normed hidden states through the head, fused: loss_BL without the logits."""
        return self.factory.head_loss(self.lm_head, hn_LBD, self.tied_weight, targets_BL, self.loss_chunk_tokens)

    def run_blocks(
        self, h_LBD: torch.Tensor, state: RoutingState, indices: range
    ) -> tuple[torch.Tensor, dict[int, MoELayerOutput]]:
        """Blocks `indices` in order (recomputed in backward under full recompute); the MoE blocks' outputs."""
        moe: dict[int, MoELayerOutput] = {}
        recompute = self.recompute_blocks and torch.is_grad_enabled() and state.cache is None
        for index in indices:
            layer = self.layers[index]
            if recompute:
                h_LBD, aux = checkpointed_block(layer, h_LBD, self.rotary, state)
            else:
                h_LBD, aux = layer(h_LBD, self.rotary, state)
            if aux is not None:
                moe[index] = aux
        return h_LBD, moe

    def set_dense_phase(self, dense: bool) -> None:
        """Dense warm-up: every MoE block routes everything to expert 0 (Lory's upcycling recipe)."""
        for layer in self.layers:
            if hasattr(getattr(layer, "ffn", None), "dense_phase"):  # a pipeline stage holds only its blocks
                layer.ffn.dense_phase = dense


def build_model(
    cfg: ModelConfig,
    seed: int,
    factory: LayerFactory | None = None,
    moe: MoEConfig | None = None,
    part: Part | None = None,
) -> Transformer:
    """A Transformer (or a pipeline rank's part of it) with every parameter initialized from (seed, parameter name)."""
    model = Transformer(cfg, factory, moe, part)
    init_parameters(model, cfg, seed, model.moe_cfg.gru_bias_init)
    return model
