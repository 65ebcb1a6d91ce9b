"""Slow, obviously correct references: the oracles the fast paths are tested against.

Shape legend: N tokens (sorted by expert), E experts, I/O in/out features.
"""

from __future__ import annotations

import torch


def grouped_linear_loop(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Each expert's rows of x (in order) times that expert's weight: a Python loop over experts."""
    outs, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        outs.append(x_NI[start : start + count] @ w_EOI[e].t())
        start += count
    return torch.cat(outs) if outs else x_NI.new_zeros(0, w_EOI.shape[1])


def sparsemixer_weight_st(
    logits_TE: torch.Tensor, mask_TE: torch.Tensor, chosen_T: torch.Tensor, omega_T: torch.Tensor
) -> torch.Tensor:
    """SparseMixer-v2's weight as straight-through autograd: p_D + stopgrad((ω − 1)·p_D), p = masked softmax."""
    p_chosen_T = logits_TE.masked_fill(mask_TE, float("-inf")).softmax(-1).gather(1, chosen_T[:, None]).squeeze(1)
    return p_chosen_T + ((omega_T - 1.0) * p_chosen_T).detach()


def merged_swiglu_loop(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF) -> torch.Tensor:
    """Lory's merged SwiGLU one segment at a time: the merged weights spelled out as sums over experts."""
    outs = []
    for s in range(x_STD.shape[0]):
        gate = sum(w_SE[s, e] * w_gate_EFD[e] for e in range(w_SE.shape[1]))
        up = sum(w_SE[s, e] * w_up_EFD[e] for e in range(w_SE.shape[1]))
        down = sum(w_SE[s, e] * w_down_EDF[e] for e in range(w_SE.shape[1]))
        x = x_STD[s]
        outs.append((torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t())
    return torch.stack(outs)
