"""AdamW (decay on matrices only) and the warm-up + decay learning-rate schedule (cosine, linear, constant, WSD)."""

from __future__ import annotations

import math

import torch
from torch import nn

from megamoe.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices get weight decay; vectors (norm scales) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (lr is set per step by the schedule)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=False,
    )


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    """Warm-up length in steps (optim.warmup_steps, else the fraction of the run)."""
    return cfg.warmup_length(max_steps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of the update made at 0-indexed step.

    With W warm-up steps, M = max_steps, peak = optim.lr and floor = peak · optim.min_lr_ratio:
    warm-up: peak · (step + 1) / W for step < W; then, with p = min((step - W) / (M - W), 1):
    cosine: floor + (peak - floor) · (1 + cos πp) / 2; linear: peak - (peak - floor) · p; constant: peak.
    wsd: peak up to D0 = M - round(decay_fraction · M), then peak - (peak - floor) · min((step - D0 + 1) / (M - D0), 1).
    Cosine and linear reach the floor at step M, one past the last update; wsd counts the update being
    made, so its last update (step M - 1) is at the floor and a 1-step cooldown still decays. Before D0
    nothing depends on M: runs that differ only in M (explicit W) share every update before the earlier D0.
    """
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.decay_style == "wsd":
        start = cfg.decay_start(max_steps)
        progress = min(max(step - start + 1, 0) / max(max_steps - start, 1), 1.0)
        return cfg.lr - (cfg.lr - floor) * progress
    progress = min((step - warm) / max(max_steps - warm, 1), 1.0)
    if cfg.decay_style == "constant":
        return cfg.lr
    if cfg.decay_style == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
