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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megamoe.config import MoEConfig
from megamoe.ops.sparsemixer import sparsemixer_weight


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
    grad_scale_A: torch.Tensor | None = None
    """Multiplies the gradient reaching each assignment's expert output (SparseMixer-v2's Algorithm 1)."""


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


def group_limited(choice_TE: torch.Tensor, cfg: MoEConfig, k: int) -> torch.Tensor:
    """choice_TE with the experts outside each token's top moe.topk_groups groups set to -inf (DeepSeek-V3).

    A group's score is the sum of its top-n selection scores, n = max(1, k // topk_groups) (at most the
    group's size); equal group scores keep the lower group index.
    """
    groups, keep = cfg.num_groups, cfg.topk_groups
    if groups == 1 or keep in (0, groups):
        return choice_TE
    tokens, num_experts = choice_TE.shape
    per = num_experts // groups
    n = min(per, max(1, k // keep))
    group_TG = choice_TE.view(tokens, groups, per).topk(n, dim=-1).values.sum(-1)
    top_TM = torch.sort(group_TG, dim=-1, descending=True, stable=True).indices[:, :keep]
    kept_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, top_TM, True)
    return choice_TE.masked_fill(~kept_TG.repeat_interleave(per, dim=1), float("-inf"))


def select(score_TE: torch.Tensor, cfg: MoEConfig, k: int, bias_E: torch.Tensor | None) -> torch.Tensor:
    """expert_TK: the top-k by score + bias (aux_free's bias steers the choice only), inside the kept groups."""
    choice_TE = score_TE.detach() if bias_E is None else score_TE.detach() + bias_E.to(score_TE.dtype)
    return torch.topk(group_limited(choice_TE, cfg, k), k, dim=-1).indices


def token_choice(
    logits_TE: torch.Tensor, cfg: MoEConfig, k: int, capacity_factor: float, bias_E: torch.Tensor | None = None
) -> Assignments:
    """Top-k experts per token by score (+ bias); capacity (if capacity_factor > 0) drops the overflow.

    The combine weights are the unbiased scores of the chosen experts (renormalized over them with
    moe.renormalize), times moe.routed_scaling.
    """
    score_TE = scores(logits_TE, cfg.score_fn)
    expert_TK = select(score_TE, cfg, k, bias_E)
    top_score_TK = score_TE.gather(1, expert_TK)
    weight_TK = top_score_TK
    if cfg.renormalize:
        weight_TK = top_score_TK / top_score_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    if cfg.routed_scaling != 1.0:
        weight_TK = weight_TK * cfg.routed_scaling
    kept_TK = torch.ones_like(expert_TK, dtype=torch.bool)
    if capacity_factor > 0:
        cap = capacity(len(logits_TE), cfg, capacity_factor, k)
        kept_TK = apply_capacity(expert_TK, top_score_TK.detach(), cap, cfg)
    token_TK = torch.arange(len(logits_TE), device=logits_TE.device)[:, None].expand_as(expert_TK)
    return Assignments(token_TK[kept_TK], expert_TK[kept_TK], weight_TK[kept_TK], expert_TK, kept_TK)


def _default_draw(tokens: int, device: torch.device) -> Draw:
    """Draws from torch's default generator (when no routing context is given)."""
    return lambda kind, shape: torch.rand((tokens, *shape), device=device)


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


Draw = Callable[[str, tuple[int, ...]], torch.Tensor]
"""draw(kind, shape) → U(0, 1) samples of shape (T, *shape) from a layout-independent stream."""


def relative_threshold_mask(scores_TE: torch.Tensor, eps: float) -> torch.Tensor:
    """SparseMixer-v2's mask: expert i is out iff (z_max − z_i) / max(|z_i|, z_max) > 2·eps (0/0 stays in)."""
    top_T1 = scores_TE.max(-1, keepdim=True).values
    return (top_T1 - scores_TE) / scores_TE.abs().clamp(min=top_T1) > 2 * eps


def sparsemixer_round(scores_TE, logits_TE, cfg: MoEConfig, training: bool, gumbel_u, heun_u):
    """One round: mask, sample (Gumbel-max) or argmax, ω, and the weight with its custom gradient."""
    masked_TE = scores_TE.masked_fill(relative_threshold_mask(scores_TE, cfg.jitter_eps), float("-inf"))
    if training:
        chosen_T = (masked_TE - torch.log(-torch.log(gumbel_u.clamp(1e-20, 1 - 1e-7)))).argmax(-1)
    else:
        chosen_T = masked_TE.argmax(-1)
    probs_TE = masked_TE.softmax(-1)
    omega_T = torch.ones_like(chosen_T, dtype=probs_TE.dtype)
    if training:  # Heun's third-order mask: ω = 1 for the argmax or with probability 1/4, else 1/3
        keep_T = (chosen_T == probs_TE.argmax(-1)) | (heun_u > 0.75)
        omega_T = torch.where(keep_T, omega_T, omega_T / 3)
    return chosen_T, sparsemixer_weight(logits_TE, probs_TE, chosen_T, omega_T), omega_T


def sparsemixer(logits_TE: torch.Tensor, cfg: MoEConfig, training: bool, draw: Draw | None) -> Assignments:
    """GRIN's SparseMixer-v2: K rounds of sampling without replacement, weights not renormalized, dropless."""
    k, tokens = cfg.top_k, len(logits_TE)
    draw = draw or _default_draw(tokens, logits_TE.device)
    gumbel_TKE = draw("gumbel", (k, cfg.num_experts)) if training else None
    heun_TK = draw("heun", (k,)) if training else None
    scores_TE = logits_TE.detach().float()
    chosen, weights, omegas = [], [], []
    for r in range(k):
        u = (gumbel_TKE[:, r], heun_TK[:, r]) if training else (None, None)
        chosen_T, weight_T, omega_T = sparsemixer_round(scores_TE, logits_TE, cfg, training, *u)
        chosen.append(chosen_T)
        weights.append(weight_T)
        omegas.append(omega_T)
        scores_TE = scores_TE.scatter(1, chosen_T[:, None], float("-inf"))
    expert_TK = torch.stack(chosen, 1)
    token_TK = torch.arange(tokens, device=logits_TE.device)[:, None].expand_as(expert_TK)
    scale_A = None if cfg.omega_scales_expert_grad else 1.0 / torch.stack(omegas, 1).reshape(-1)
    kept_TK = torch.ones_like(expert_TK, dtype=torch.bool)
    return Assignments(
        token_TK.reshape(-1), expert_TK.reshape(-1), torch.stack(weights, 1).reshape(-1), expert_TK, kept_TK, scale_A
    )


def route(
    logits_TE: torch.Tensor,
    cfg: MoEConfig,
    training: bool,
    draw: Draw | None = None,
    bias_E: torch.Tensor | None = None,
) -> Assignments:
    """The configured routing; expert choice falls back to causal token choice outside training.

    bias_E: aux_free's per-expert selection bias (token choice only)."""
    if cfg.routing == "sparsemixer":
        return sparsemixer(logits_TE, cfg, training, draw)
    if cfg.routing == "expert_choice":
        if training:
            return expert_choice(logits_TE, cfg)
        k = cfg.eval_top_k or max(1, round(cfg.capacity_factor))
        return token_choice(logits_TE, cfg, min(k, cfg.num_experts), cfg.eval_capacity_factor)
    capacity_factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    return token_choice(logits_TE, cfg, cfg.top_k, capacity_factor, bias_E)
