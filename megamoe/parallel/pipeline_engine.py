"""The optimizer side of a pipeline rank: gradient reduction, global-norm clipping, AdamW.

After the schedule has accumulated every micro-batch's gradient, each gradient is averaged over
data parallel with the same convention as DeepSpeed's engine (dense: sum over the data-parallel
group / dp; experts: sum over their expert-data-parallel replicas / dp), replicas kept on several
pipeline ranks (the tied embedding, RMoE's GRU) are summed over those ranks, and the global norm
counts every element once: replicas only on their owner's stage (a tensor-parallel tied embedding
too), tensor-parallel shards summed over TP, replicated parameters once per stage, experts over the
world divided by their replicas, all summed over the pipeline. ZeRO is not used with pipelines
(parallel.zero_stage must be 0).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.pipeline import Replica
from megamoe.utils.state import TorchAdamEngine


class PipelineEngine(TorchAdamEngine):
    """AdamW on this rank's parameters, with the reductions a pipeline needs."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: float, groups: ParallelGroups,
        replicas: list[Replica], bf16: bool,
    ):  # fmt: skip
        self.model, self.groups, self.replicas = model, groups, replicas
        self.optimizer = optimizer
        self.clip = clip or math.inf
        self.bf16 = bf16
        self.device_type = groups.device.type
        self._not_owned = {r.name for r in replicas if not r.owner}

    @torch.no_grad()
    def _reduce(self) -> None:
        """Average gradients over data parallel; sum replicas over their pipeline ranks."""
        dp, edp = self.groups.dp, self.groups.edp
        named = dict(self.model.named_parameters())
        for param in named.values():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            expert = getattr(param, "expert", False)
            group = edp.group if expert else dp.group
            if group is not None:
                dist.all_reduce(param.grad, group=group)
            param.grad.div_(dp.size)
        for replica in self.replicas:
            if replica.group is not None:
                dist.all_reduce(named[replica.name].grad, group=replica.group)

    @torch.no_grad()
    def _norm(self) -> float:
        """Global gradient norm over every rank, each element counted once."""
        sharded, replicated, expert = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        for name, param in self.model.named_parameters():
            if name in self._not_owned:  # a replica counts on its owner's stage only (sharded or not)
                continue
            square = param.grad.detach().double().pow(2).sum().cpu()
            if getattr(param, "expert", False):
                expert += square
            elif getattr(param, "shards", ()):
                sharded += square
            else:
                replicated += square
        if self.groups.tp.group is not None:
            dist.all_reduce(sharded, group=self.groups.tp.group)
        stage = torch.stack([sharded, replicated])
        dist.all_reduce(stage, group=self.groups.pp.group)
        dist.all_reduce(expert)
        return float((stage.sum() + expert / self.groups.edp.size).sqrt())

    def step(self) -> float:
        """Reduce, clip, step (skipped when the norm is not finite), zero; returns the pre-clip norm."""
        self._reduce()
        norm = self._norm()
        if math.isfinite(norm):
            coef = self.clip / (norm + 1e-6)  # torch's clip_grad_norm_ (PlainEngine)
            if coef < 1:
                torch._foreach_mul_([p.grad for p in self.model.parameters()], coef)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm
