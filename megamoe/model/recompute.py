"""Activation recompute (train.recompute): keep fewer activations in forward, recompute them in backward.

* full: each transformer block keeps only its input; its whole forward is re-run in backward.
* selective (Megatron's term): the attention core (scaled_dot_product_attention) and the
  MoE/Lory expert intermediates (each expert's or merged SwiGLU's gate, up and SiLU) are recomputed;
  projections, norms and routing keep their activations.

torch's non-reentrant checkpoint re-runs the same ops on the same inputs, so losses and gradients
equal those without recompute bit for bit. What a block reads besides its input is passed in as an
explicit input: RMoE's GRU state is advanced by every MoE block, so a recompute must start from the
state the block saw, not the one later blocks left behind. Routing draws are seeded by (seed,
step, layer, sample id), and without a routing context torch's RNG state is restored by the
checkpoint, so GRIN's sampling and input jitter draw the same values again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def maybe_checkpoint(enabled: bool, fn: Callable, *args):
    """fn(*args), its activations recomputed in backward when enabled and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _block_with_state(layer, rotary, state, x_LBD: torch.Tensor, h_TP: torch.Tensor | None):
    """One block on a copy of the routing state that starts from h_TP; returns (y, aux, new h_TP)."""
    local = dataclasses.replace(state, h_TP=h_TP)
    y_LBD, aux = layer(x_LBD, rotary, local)
    return y_LBD, aux, local.h_TP


def checkpointed_block(layer, x_LBD: torch.Tensor, rotary, state):
    """A block under full recompute; the routing state advances as without it."""
    y_LBD, aux, state.h_TP = checkpoint(_block_with_state, layer, rotary, state, x_LBD, state.h_TP, use_reentrant=False)
    return y_LBD, aux


def set_recompute(model: torch.nn.Module, mode: str) -> None:
    """Apply train.recompute to a model: full on the Transformer, selective on the modules that support it."""
    if mode not in MODES:
        raise ValueError(f"train.recompute must be one of {MODES}, got {mode!r}")
    for module in model.modules():
        if hasattr(module, "recompute_core"):
            module.recompute_core = mode == "selective"
        if hasattr(module, "recompute_blocks"):
            module.recompute_blocks = mode == "full"
