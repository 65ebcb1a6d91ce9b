"""The MoE FFN block: scorer → routing → dispatch to experts → combine (+ shared experts, + residual dense FFN).

Shape legend: L sequence, l this rank's routed rows of it, B batch, D width, T = l·B routed tokens,
E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.layers import SwiGLU
from megamoe.model.moe.balance import BIAS
from megamoe.model.moe.losses import balance_loss, z_loss
from megamoe.model.moe.noise import uniform
from megamoe.model.moe.routing import Assignments, capacity, route, scores
from megamoe.model.moe.scorer import Scorer
from megamoe.model.moe.state import RoutingState
from megamoe.model.moe.stats import RoutingStats, routing_stats

if TYPE_CHECKING:
    from megamoe.model.factory import LayerFactory


@dataclass
class MoELayerOutput:
    """What a MoE block reports besides its output: losses (scaled, with grad) and statistics (no grad)."""

    losses: dict[str, torch.Tensor]
    stats: RoutingStats
    segment_weights: torch.Tensor | None = None
    """Lory: routing weights of every segment of the micro-batch, (N, B, E), detached."""
    record: dict[str, torch.Tensor] | None = None
    """Per-token routing decisions for analysis (blocks with record_routing set): see MoEFFN.record."""


class MoEFFN(nn.Module):
    """Routed SwiGLU experts, optional shared experts and OpenMoE's residual dense FFN."""

    def __init__(self, model_cfg: ModelConfig, cfg: MoEConfig, factory: LayerFactory, index: int = 0):
        super().__init__()
        self.cfg, self.index = cfg, index
        hidden = cfg.expert_hidden_size or model_cfg.ffn_hidden
        self.scorer = Scorer(model_cfg.d_model, cfg)
        self.experts = factory.experts(cfg.num_experts, model_cfg.d_model, hidden)
        self.dispatcher = factory.dispatcher(cfg.num_experts)
        self.tokens = factory.token_group()
        shared = hidden * cfg.num_shared_experts
        self.shared = SwiGLU(model_cfg.d_model, shared, factory) if shared else None
        self.dense = SwiGLU(model_cfg.d_model, model_cfg.ffn_hidden, factory) if cfg.residual else None
        self.record_routing = False
        """Analysis: also return every token's routing decisions (MoELayerOutput.record)."""
        if cfg.balance == "aux_free":  # state, not a parameter: updated after each optimizer step, checkpointed
            self.register_buffer(BIAS, torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x_LBD: torch.Tensor, state: RoutingState | None = None) -> tuple[torch.Tensor, MoELayerOutput]:
        """The block's output and its losses/statistics (state: routing context, RMoE's GRU state)."""
        state = state or RoutingState()
        x_lBD = self.tokens.split(x_LBD)
        rows, batch, dim = x_lBD.shape
        x_TD = x_lBD.reshape(-1, dim)
        draw = self._draw(state, rows, batch, x_TD.device)
        logits_TE = self.logits(x_TD, state, draw)
        assign = route(logits_TE, self.cfg, self.training, draw, getattr(self, BIAS, None))
        y_TD = self.dispatcher(x_TD, assign, self.experts, self._pad_to(len(x_TD)))
        y_LBD = self.tokens.merge(y_TD.view(rows, batch, dim).to(x_LBD.dtype))
        for extra in (self.shared, self.dense):
            if extra is not None:
                y_LBD = y_LBD + extra(x_LBD)
        token_T = torch.arange(len(x_TD), device=x_TD.device)
        losses = self.aux_losses(logits_TE, assign, token_T % batch, batch)
        first, length = self.tokens.span(rows)
        stats = routing_stats(logits_TE, assign, token_T // batch + first, length)
        record = self.record(logits_TE, assign, rows, batch) if self.record_routing else None
        return y_LBD, MoELayerOutput(losses, stats, record=record)

    @torch.no_grad()
    def record(self, logits_TE: torch.Tensor, assign: Assignments, rows: int, batch: int) -> dict[str, torch.Tensor]:
        """probs_LBE (router scores), weight_LBE (combine weight, 0 = not processed) and, for token choice,
        choice_LBK (requested experts in choice order) and kept_LBK (False = dropped)."""
        num_experts = logits_TE.shape[1]
        weight_TE = torch.zeros_like(logits_TE, dtype=torch.float32)
        weight_TE.index_put_((assign.token_A, assign.expert_A), assign.weight_A.float(), accumulate=True)
        out = {
            "probs_LBE": scores(logits_TE.float(), self.cfg.score_fn).view(rows, batch, num_experts),
            "weight_LBE": weight_TE.view(rows, batch, num_experts),
        }
        if assign.requested_TK is not None:
            out["choice_LBK"] = assign.requested_TK.view(rows, batch, -1)
            out["kept_LBK"] = assign.kept_TK.view(rows, batch, -1)
        return out

    def inactive_parameters(self) -> int:
        """Expert parameters a token does not use: all but k/E of them (c/E for expert choice)."""
        per_token = self.cfg.capacity_factor if self.cfg.routing == "expert_choice" else self.cfg.top_k
        expert_params = sum(p.numel() for p in self.experts.parameters())
        return round(expert_params * (1 - min(per_token, self.cfg.num_experts) / self.cfg.num_experts))

    def _draw(self, state: RoutingState, rows: int, batch: int, device: torch.device):
        """Layout-independent U(0, 1) draws for this block's tokens: draw(kind, shape) → (T, *shape)."""
        first, length = self.tokens.span(rows)
        return lambda kind, shape: uniform(
            state.ctx, self.index, kind, (first, rows, length), batch, shape, device
        ).reshape(rows * batch, *shape)

    def logits(self, x_TD: torch.Tensor, state: RoutingState, draw) -> torch.Tensor:
        """Router logits, with multiplicative input jitter in training."""
        eps = self.cfg.input_jitter_eps
        if self.training and eps > 0:
            x_TD = x_TD * (1.0 - eps + 2 * eps * draw("jitter", (x_TD.shape[1],)))
        return self.scorer(x_TD, state, self.tokens.shared_param)

    def _pad_to(self, tokens: int) -> int | None:
        """Rows per expert when padding every expert to its capacity (token choice with a capacity)."""
        cfg = self.cfg
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        if not cfg.pad_to_capacity or factor <= 0 or cfg.routing != "topk":
            return None
        return capacity(tokens, cfg, factor, cfg.top_k)

    def aux_losses(self, logits_TE: torch.Tensor, assign: Assignments, seq_T: torch.Tensor, num_seqs: int) -> dict:
        """Balance loss (token choice, training) and router z-loss."""
        losses = {}
        if self.training and assign.requested_TK is not None and self.cfg.uses_balance_loss:
            losses["balance"] = balance_loss(logits_TE, assign.requested_TK, seq_T, num_seqs, self.cfg, self.tokens)
        if self.cfg.z_loss_coef > 0:
            losses["z"] = z_loss(logits_TE, self.cfg, self.tokens)
        return losses
