"""How one process turns micro-batch losses into optimizer steps.

`PlainEngine` is the single-process reference: gradient accumulation, global-norm clipping,
torch AdamW. `megamoe.parallel.zero.ZeroEngine` is its distributed twin under DeepSpeed; both
expose the same methods, and the checkpoint format is the same for both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megamoe.config import OptimConfig
from megamoe.train.optim import build_optimizer
from megamoe.utils.state import TorchAdamEngine


class PlainEngine(TorchAdamEngine):
    """Single-process training steps."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, micro_batches: int, bf16: bool):
        self.model = model
        self.optimizer = build_optimizer(model, cfg)
        self.clip = cfg.grad_clip or math.inf
        self.micro_batches = micro_batches
        self.device_type = next(model.parameters()).device.type
        self.bf16 = bf16

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
