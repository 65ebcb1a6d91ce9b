"""Lory's dense warm-up and upcycling (arXiv 2405.03133 §3): train dense, then copy the FFN into every expert.

During the first W = moe.dense_warmup_steps (else ⌊moe.dense_warmup_fraction · train.max_steps⌋) steps
every Lory layer routes all segments to expert 0, so the model is exactly a dense transformer. At the
start of step W (0-indexed), before its forward pass:

* every expert's gate/up/down becomes a copy of expert 0 (the trained dense FFN), and so do their
  AdamW moments (exp_avg, exp_avg_sq): the copies continue with the dense FFN's step sizes;
* the scorer (router, RMoE's projector and shared GRU) is drawn afresh from the init distribution
  with a seed of its own, and its moments are zeroed. Adam's step count is global, so their bias
  correction is ≈ 1: the first router updates are at most lr·(1−β1)/√(1−β2) per element.

Identical experts merge to the dense FFN for any routing weights, so the loss is continuous across
the switch. A checkpoint written at step W still holds the dense weights; resuming from it upcycles
at its first step, exactly like the uninterrupted run, and a checkpoint after W is not upcycled again.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megamoe.config import Config
from megamoe.model.init import initial_value
from megamoe.model.moe.lory import LoryFFN
from megamoe.utils.state import OPTIM_KEYS

UPCYCLE_SEED_OFFSET = 7919
"""Added to train.seed for the fresh router (so it differs from the router of step 0)."""


def warmup_steps(cfg: Config) -> int:
    """Dense steps before the switch (0: no warm-up)."""
    return cfg.moe.dense_warmup_steps or math.floor(cfg.moe.warmup_fraction * cfg.train.max_steps)


def _split_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the Lory expert weights and of every routing parameter."""
    experts, routers = [], []
    for prefix, module in model.named_modules():
        if isinstance(module, LoryFFN):
            experts += [f"{prefix}.experts.{n}" for n, _ in module.experts.named_parameters()]
            routers += [f"{prefix}.scorer.{n}" for n, _ in module.scorer.named_parameters()]
    gru = getattr(model, "router_gru", None)
    if gru is not None:
        routers += [f"router_gru.{n}" for n, _ in gru.named_parameters()]
    return experts, routers


@torch.no_grad()
def upcycle(model: nn.Module, engine, cfg: Config, updates: int) -> None:
    """Experts ← expert 0 (weights and moments); routers ← fresh init, zero moments. Collective-free.

    updates: optimizer updates applied so far (Adam's step count, kept as it is).
    """
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = engine.optimizer_state()
    experts, routers = _split_names(model)
    for name in experts:
        for tensor in (params[name], *(state[f"{name}.{key}"] for key in OPTIM_KEYS)):
            tensor.copy_(tensor[:1].clone().expand_as(tensor))
    named = dict(model.named_parameters())
    for name in routers:
        fresh = initial_value(name, named[name], cfg.model, cfg.train.seed + UPCYCLE_SEED_OFFSET, cfg.moe.gru_bias_init)
        params[name] = fresh.to(params[name])
        for key in OPTIM_KEYS:
            state[f"{name}.{key}"].zero_()
    engine.load_state(params, state, updates)
