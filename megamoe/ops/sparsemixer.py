"""SparseMixer-v2 (GRIN) combine weight with its custom router gradient.

Shape legend: T tokens, E experts.
Forward: ω·p_D, where p is the round's masked softmax, D the sampled (or argmax) expert and
ω ∈ {1, 1/3} the Heun-mask value. Backward to the logits: g·p_D·(1{j=D} − p_j), the softmax
Jacobian row of D, where g is the weight's incoming gradient. This is independent of ω, zero on
masked experts, and sums to zero over j. `reference.sparsemixer_weight_st` is the same math as a
straight-through expression.
"""

from __future__ import annotations

import torch


class SparseMixerWeight(torch.autograd.Function):
    """weight_T = ω·p_D; ∂/∂logits = g·p_D·(onehot(D) − p)."""

    @staticmethod
    def forward(ctx, logits_TE, probs_TE, chosen_T, omega_T):
        p_chosen_T = probs_TE.gather(1, chosen_T[:, None]).squeeze(1)
        ctx.save_for_backward(probs_TE, chosen_T, p_chosen_T)
        return omega_T * p_chosen_T

    @staticmethod
    def backward(ctx, grad_T):
        probs_TE, chosen_T, p_chosen_T = ctx.saved_tensors
        g_T = grad_T * p_chosen_T
        grad_TE = -probs_TE * g_T[:, None]
        grad_TE.scatter_add_(1, chosen_T[:, None], g_T[:, None])
        return grad_TE, None, None, None


def sparsemixer_weight(
    logits_TE: torch.Tensor, probs_TE: torch.Tensor, chosen_T: torch.Tensor, omega_T: torch.Tensor
) -> torch.Tensor:
    """ω·p_D with the SparseMixer-v2 router gradient (probs_TE: the round's masked softmax, no grad)."""
    return SparseMixerWeight.apply(logits_TE, probs_TE.detach(), chosen_T, omega_T)
