"""Routing: turn router logits into assignments (token, expert, weight) — token choice and expert choice.

Shape legend: T tokens routed by this rank (flattened sequence-first: token t = position·B + batch),
E experts, K choices per token, A kept assignments, C expert capacity.

Token order is the flattened sequence-first order, so "earlier" means an earlier position (then a
lower batch index): with capacity, all first choices are placed before any second choice and,
within a choice rank, in token order; requests beyond an expert's capacity are dropped and
contribute nothing ("drop towards the end").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megamoe.config import MoEConfig


@dataclass
class Assignments:
    """Who computes what: one row per kept (token, expert) pair."""

    token_A: torch.Tensor
    """Index of the token (0..T-1)."""
    expert_A: torch.Tensor
    """Expert that processes it."""
    weight_A: torch.Tensor
    """Combine weight of its output (fp32)."""
    requested_TK: torch.Tensor | None = None
    """Token choice: the expert of each (token, choice) before capacity; None for expert choice."""
    kept_TK: torch.Tensor | None = None
    """Token choice: whether that choice was kept (not dropped)."""


def scores(logits_TE: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Router scores over experts: softmax, or element-wise sigmoid."""
    return logits_TE.softmax(-1) if score_fn == "softmax" else logits_TE.sigmoid()


def capacity(tokens: int, cfg: MoEConfig, capacity_factor: float, k: int) -> int:
    """Expert capacity C = max(min_capacity, ceil(formula)) for a group of `tokens` tokens."""
    raw = capacity_factor * tokens / cfg.num_experts
    if cfg.capacity_formula == "k*cf*G/E":
        raw *= k
    return max(cfg.min_capacity, math.ceil(raw - 1e-9))


def rank_within_expert(expert_R: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For requests listed in priority order: how many earlier requests went to the same expert."""
    order_R = torch.sort(expert_R, stable=True).indices
    counts_E = torch.bincount(expert_R, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_R = torch.empty_like(expert_R)
    rank_R[order_R] = torch.arange(len(expert_R), device=expert_R.device) - starts_E[expert_R[order_R]]
    return rank_R


def apply_capacity(expert_TK: torch.Tensor, score_TK: torch.Tensor, cap: int, cfg: MoEConfig) -> torch.Tensor:
    """kept_TK: which choices fit in their expert's capacity (priority by drop_policy)."""
    tokens, k = expert_TK.shape
    expert_R = expert_TK.t().reshape(-1)  # rank-major: all first choices, then all second choices, ...
    if cfg.drop_policy == "probs":
        by_score_R = torch.sort(score_TK.t().reshape(-1), descending=True, stable=True).indices
        rank_sorted = rank_within_expert(expert_R[by_score_R], cfg.num_experts)
        rank_R = torch.empty_like(rank_sorted)
        rank_R[by_score_R] = rank_sorted
    else:
        rank_R = rank_within_expert(expert_R, cfg.num_experts)
    return (rank_R < cap).view(k, tokens).t()


def token_choice(logits_TE: torch.Tensor, cfg: MoEConfig, k: int, capacity_factor: float) -> Assignments:
    """Top-k experts per token by score; capacity (if capacity_factor > 0) drops the overflow."""
    score_TE = scores(logits_TE, cfg.score_fn)
    top_score_TK, expert_TK = torch.topk(score_TE, k, dim=-1)
    weight_TK = top_score_TK
    if cfg.renormalize:
        weight_TK = top_score_TK / top_score_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    kept_TK = torch.ones_like(expert_TK, dtype=torch.bool)
    if capacity_factor > 0:
        cap = capacity(len(logits_TE), cfg, capacity_factor, k)
        kept_TK = apply_capacity(expert_TK, top_score_TK.detach(), cap, cfg)
    token_TK = torch.arange(len(logits_TE), device=logits_TE.device)[:, None].expand_as(expert_TK)
    return Assignments(token_TK[kept_TK], expert_TK[kept_TK], weight_TK[kept_TK], expert_TK, kept_TK)


def expert_capacity(tokens: int, c: float, num_experts: int) -> int:
    """Expert choice: k_cap = round(n·c/E), at least 1 and at most n (flaxformer's rounding)."""
    return min(tokens, max(1, round(c * tokens / num_experts)))


def expert_choice(logits_TE: torch.Tensor, cfg: MoEConfig) -> Assignments:
    """Each expert takes its k_cap highest-scoring tokens (softmax over experts); non-causal."""
    score_TE = logits_TE.softmax(-1)
    k_cap = expert_capacity(len(logits_TE), cfg.capacity_factor, cfg.num_experts)
    weight_EC, token_EC = torch.topk(score_TE.t(), k_cap, dim=-1)
    expert_EC = torch.arange(cfg.num_experts, device=logits_TE.device)[:, None].expand_as(token_EC)
    return Assignments(token_EC.reshape(-1), expert_EC.reshape(-1), weight_EC.reshape(-1))


def route(logits_TE: torch.Tensor, cfg: MoEConfig, training: bool) -> Assignments:
    """The configured routing; expert choice falls back to causal token choice outside training."""
    if cfg.routing == "expert_choice":
        if training:
            return expert_choice(logits_TE, cfg)
        k = cfg.eval_top_k or max(1, round(cfg.capacity_factor))
        return token_choice(logits_TE, cfg, min(k, cfg.num_experts), cfg.eval_capacity_factor)
    capacity_factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    return token_choice(logits_TE, cfg, cfg.top_k, capacity_factor)
