"""Optimizer state shared by the single-process, pipeline and DeepSpeed engines."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state tensors, saved in checkpoints as '<parameter name>.<key>'."""


def adam_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq of every parameter of a torch AdamW, by '<param name>.<key>' (zeros before a step)."""
    state = {}
    for name, param in model.named_parameters():
        param_state = optimizer.state.get(param, {})
        for key in OPTIM_KEYS:
            value = param_state.get(key)
            state[f"{name}.{key}"] = torch.zeros_like(param) if value is None else value
    return state


@torch.no_grad()
def load_adam_state(model: nn.Module, optimizer: torch.optim.Optimizer, params: dict, state: dict, step: int) -> None:
    """Restore every parameter, its exp_avg / exp_avg_sq, and the step count into a torch AdamW."""
    for name, param in model.named_parameters():
        param.copy_(params[name])
        optimizer.state[param] = {
            "step": torch.tensor(float(step)),
            **{key: state[f"{name}.{key}"].to(param.device).clone() for key in OPTIM_KEYS},
        }


class TorchAdamEngine:
    """What the single-process and pipeline engines share: a torch AdamW on self.model, optional bf16 autocast."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    bf16: bool
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast with fp32 master weights, or nothing."""
        if self.bf16:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every param group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """exp_avg / exp_avg_sq of every parameter, by '<param name>.<key>'."""
        return adam_state(self.model, self.optimizer)

    def load_state(self, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], step: int) -> None:
        """Restore every parameter, its exp_avg / exp_avg_sq, and the step count."""
        load_adam_state(self.model, self.optimizer, params, state, step)
