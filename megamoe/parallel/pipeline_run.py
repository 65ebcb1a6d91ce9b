"""Running the pipeline: torch.distributed.pipelining stages and schedule for training and evaluation.

Shape legend: m micro-batches, B micro-batch, L sequence, V vocabulary, D domains, K Lory layers, E experts.
The schedule runs one optimizer step's m micro-batches of this data-parallel rank (GPipe, 1F1B or
interleaved 1F1B; torch's own implementations). Evaluation runs the same schedule forward-only,
m batches at a time (padded with weight-0 repeats), and the last stage's per-token losses and
every stage's Lory routing are summed over the pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from megamoe.config import Config
from megamoe.model.transformer import Transformer
from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.pipeline import Plan, plan_stages, pp_stage_of

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class Pipeline:
    """This rank's chunks of the model and the schedule that runs them."""

    def __init__(self, model: Transformer, cfg: Config, groups: ParallelGroups):
        self.model, self.cfg, self.groups = model, cfg, groups
        self.plan: Plan = plan_stages(model, cfg, groups)
        self.m = groups.layout.micro_batches
        total = len(self.plan.bounds)
        self.stages = [
            PipelineStage(chunk, pp_stage_of(self.plan, chunk), total, groups.device, group=groups.pp.group)
            for chunk in self.plan.chunks
        ]
        self._token_losses: list[torch.Tensor] = []
        kind = cfg.parallel.pipeline_schedule
        kwargs = {"n_microbatches": self.m, "loss_fn": self._loss, "scale_grads": False}
        if kind == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(self.stages, **kwargs)
        else:
            self.schedule = SCHEDULES[kind](self.stages[0], **kwargs)

    @property
    def first(self) -> bool:
        """This rank feeds the pipeline (holds chunk 0)."""
        return any(c.first for c in self.plan.chunks)

    @property
    def last(self) -> bool:
        """This rank computes the loss (holds the last chunk)."""
        return any(c.last for c in self.plan.chunks)

    def _loss(self, out_LB: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        """A micro-batch's mean token loss / m (its token losses kept for evaluation), from logits or fused."""
        model = self.model
        fused = model.fuses_loss(targets_BL)
        token_BL = model.head_loss(out_LB, targets_BL) if fused else model.factory.token_loss(out_LB, targets_BL)
        self._token_losses.append(token_BL.detach())
        return token_BL.mean() / self.m

    def _run(self, tokens_BL, targets_BL, ids_B, step: int, train: bool) -> list[dict]:
        """One schedule step over m micro-batches; returns each micro-batch's MoE outputs (this rank's blocks)."""
        for chunk in self.plan.chunks:
            chunk.seed, chunk.step = self.cfg.train.seed, step
            chunk.outputs.clear()
        self._token_losses.clear()
        args = (tokens_BL, ids_B) if self.first else ()
        extra = {"target": targets_BL, "losses": []} if self.last else {}
        run = self.schedule.step if train else self.schedule.eval
        run(*args, **extra)
        # torch's schedule may first run a stage and the loss on placeholder inputs (shape and loss checks):
        # the last m calls are the micro-batches, in order
        self._token_losses[:] = self._token_losses[-self.m :]
        outputs = [chunk.outputs[-self.m :] for chunk in self.plan.chunks]
        return [{k: v for per_chunk in outputs for k, v in per_chunk[i].items()} for i in range(self.m)]

    def train_step(self, tokens_BL, targets_BL, ids_B, step: int) -> tuple[torch.Tensor, list[dict]]:
        """Forward and backward of m micro-batches: (Σ micro-batch mean losses on every stage, MoE outputs)."""
        outputs = self._run(tokens_BL, targets_BL, ids_B, step, train=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.groups.device)
        if self.last:
            loss_sum += sum(float(t.float().mean()) for t in self._token_losses)
        dist.all_reduce(loss_sum, group=self.groups.pp.group)
        return loss_sum, outputs

    @torch.no_grad()
    def eval_token_losses(self, batches: list[tuple[np.ndarray, float]], split, step: int):
        """(token_loss_BL or None off the last stage, MoE outputs) of every batch, m at a time (padded)."""
        seq_len, results = self.cfg.model.seq_len, []
        padded = batches + [(batches[0][0], 0.0)] * (-len(batches) % self.m)
        was = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(padded), self.m):
                group = padded[s : s + self.m]
                data = [split.batch(ids, seq_len) for ids, _ in group]
                tokens = torch.cat([d.tokens_BL for d in data]).to(self.groups.device)
                targets = torch.cat([d.targets_BL for d in data]).to(self.groups.device)
                ids = torch.from_numpy(np.concatenate([ids for ids, _ in group])).to(self.groups.device)
                outputs = self._run(tokens, targets, ids, step, train=False)
                for i, (_, weight) in enumerate(group):
                    loss = self._token_losses[i] if self.last else None
                    results.append((data[i], weight, loss, outputs[i]))
        finally:
            self.model.train(was)
        return results[: len(batches)]
