"""Auxiliary router losses: Switch load balance α·E·Σᵢ fᵢPᵢ and the ST-MoE router z-loss.

Shape legend: T tokens routed by this rank, B sequences, E experts.
A TokenGroup supplies the sums over the other ranks that hold tokens of the same micro-batch
(tensor-parallel ranks) and over the data-parallel ranks, so the values and gradients are those of
the whole micro-batch (or the whole DP micro-step for the global level) on every layout.

- f_i = (requests to expert i, counted before capacity) / T, summing to k over experts; no gradient.
- P_i = mean over tokens of the token's normalized score for i (softmax, or sigmoid / Σ sigmoid).
- Minimum on perfectly uniform routing: k·α (f_i = k/E, P_i = 1/E).
"""

from __future__ import annotations

import torch

from megamoe.config import MoEConfig
from megamoe.model.moe.tokens import TokenGroup


def _probs(logits_TE: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Scores normalized to a distribution over experts."""
    if score_fn == "softmax":
        return logits_TE.softmax(-1)
    sig_TE = logits_TE.sigmoid()
    return sig_TE / sig_TE.sum(-1, keepdim=True)


def balance_loss(
    logits_TE: torch.Tensor, requested_TK: torch.Tensor, seq_T: torch.Tensor, num_seqs: int,
    cfg: MoEConfig, tokens: TokenGroup,
) -> torch.Tensor:  # fmt: skip
    """α·E·Σ fᵢPᵢ at moe.balance_loss_level (micro_batch, sequence or global)."""
    num_experts = cfg.num_experts
    probs_TE = _probs(logits_TE, cfg.score_fn)
    if cfg.balance_level == "sequence":
        flat_BE = (seq_T[:, None] * num_experts + requested_TK).reshape(-1)
        counts_BE = torch.bincount(flat_BE, minlength=num_seqs * num_experts).float().view(num_seqs, num_experts)
        psum_BE = torch.zeros(num_seqs, num_experts, device=logits_TE.device).index_add(0, seq_T, probs_TE)
        len_B = tokens.sum_tokens(torch.bincount(seq_T, minlength=num_seqs).float())
        f_BE = tokens.sum_tokens(counts_BE) / len_B[:, None]
        p_BE = tokens.sum_tokens(psum_BE) / len_B[:, None]
        return cfg.balance_loss_coef * num_experts * (f_BE.detach() * p_BE).sum(-1).mean()
    counts_E = torch.bincount(requested_TK.reshape(-1), minlength=num_experts).float()
    total = tokens.sum_tokens(torch.tensor(float(len(logits_TE)), device=logits_TE.device))
    p_E = tokens.sum_tokens(probs_TE.sum(0)) / total
    if cfg.balance_level == "global":
        f_E = tokens.sum_data_parallel(tokens.sum_tokens(counts_E)) / tokens.sum_data_parallel(total)
    else:
        f_E = tokens.sum_tokens(counts_E) / total
    return cfg.balance_loss_coef * num_experts * (f_E.detach() * p_E).sum()


def z_loss(logits_TE: torch.Tensor, cfg: MoEConfig, tokens: TokenGroup) -> torch.Tensor:
    """z-coef · mean over the micro-batch's tokens of logsumexp(logits)²."""
    lse_T = torch.logsumexp(logits_TE, dim=-1)
    total = tokens.sum_tokens(torch.tensor(float(len(logits_TE)), device=logits_TE.device))
    return cfg.z_loss_coef * tokens.sum_tokens(lse_T.pow(2).sum()) / total
