"""How one process turns micro-batch losses into optimizer steps.

`PlainEngine` is the single-process reference: gradient accumulation, global-norm clipping,
torch AdamW. `megamoe.parallel.zero.ZeroEngine` is its distributed twin under DeepSpeed; both
expose the same methods, and the checkpoint format is the same for both.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from megamoe.config import OptimConfig
from megamoe.train.optim import build_optimizer, set_lr
from megamoe.utils.state import OPTIM_KEYS


class PlainEngine:
    """Single-process training steps."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, micro_batches: int, bf16: bool):
        self.model = model
        self.optimizer = build_optimizer(model, cfg)
        self.clip = cfg.grad_clip or math.inf
        self.micro_batches = micro_batches
        self.device_type = next(model.parameters()).device.type
        self.bf16 = bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast with fp32 master weights, or nothing."""
        if self.bf16:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every param group."""
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's mean loss."""
        (loss / self.micro_batches).backward()

    def step(self) -> float:
        """Clip, step, zero the gradients; returns the pre-clip global gradient norm.

        A non-finite norm skips the update entirely (no moment or step-count change), as every engine does.
        """
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """exp_avg / exp_avg_sq of every parameter, by '<param name>.<key>'."""
        state = {}
        for name, param in self.model.named_parameters():
            param_state = self.optimizer.state.get(param, {})
            for key in OPTIM_KEYS:
                value = param_state.get(key)
                state[f"{name}.{key}"] = torch.zeros_like(param) if value is None else value
        return state

    @torch.no_grad()
    def load_state(self, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], step: int) -> None:
        """Restore every parameter, its exp_avg / exp_avg_sq, and the step count."""
        for name, param in self.model.named_parameters():
            param.copy_(params[name])
            self.optimizer.state[param] = {
                "step": torch.tensor(float(step)),
                **{key: state[f"{name}.{key}"].to(param.device).clone() for key in OPTIM_KEYS},
            }
