"""The trainer's pipeline-parallel paths: one optimizer step's micro-batches, and evaluation sums.

Shape legend: B batch, L sequence, D domains, K Lory layers, E experts. The schedule itself is in
megamoe/parallel/pipeline_run.py; here its results become what the single-process paths produce:
the summed micro-batch losses, MoE outputs per micro-batch, and per-domain evaluation sums
(losses from the last stage, Lory routing from every stage, summed over the pipeline).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import Config
from megamoe.train.domain_routing import add_domain_routing
from megamoe.train.evaluate import EvalSums, add_losses


def moe_layers(cfg: Config) -> list[int]:
    """Block indices of every MoE block of the model."""
    return [i for i in range(cfg.model.num_layers) if cfg.moe.is_moe_layer(i)]


def lory_moe_layers(cfg: Config) -> list[int]:
    """Block indices of every Lory block of the model."""
    return moe_layers(cfg) if cfg.moe.routing == "lory" else []


def gather_over_pipeline(groups, metrics: dict[str, float]) -> dict[str, float]:
    """Per-block metrics of every pipeline stage on every rank (each stage holds its own blocks' values)."""
    if groups.pp.size == 1:
        return metrics
    parts: list[dict] = [{} for _ in range(groups.pp.size)]
    dist.all_gather_object(parts, metrics, group=groups.pp.group)
    return {key: value for part in parts for key, value in part.items()}


def pipeline_step(trainer, micro: list[np.ndarray], moe) -> torch.Tensor:
    """Run the step's micro-batches through the pipeline (forward and backward); returns Σ micro-batch losses."""
    ids = np.concatenate(micro)
    tokens_BL, targets_BL = trainer._batch(trainer.train_split, ids)
    ids_B = torch.from_numpy(ids.astype(np.int64)).to(trainer.groups.device)
    with trainer.engine.autocast():
        loss_sum, outputs = trainer.pipeline.train_step(tokens_BL, targets_BL, ids_B, trainer.step)
    if moe is not None:
        for out in outputs:
            moe.add(out)
    return loss_sum.float()


def pipeline_eval_sums(trainer, batches: list[tuple[np.ndarray, float]]) -> EvalSums:
    """Per-domain eval sums of this data-parallel rank's batches, summed over the pipeline."""
    cfg, num_domains = trainer.cfg, len(trainer.data.domains)
    lory = lory_moe_layers(cfg)
    zeros_D = torch.zeros(num_domains, dtype=torch.float64)
    sums = EvalSums(
        zeros_D.clone(),
        zeros_D.clone(),
        torch.zeros(len(lory), num_domains, cfg.moe.num_experts if lory else 0, dtype=torch.float64),
    )
    for data, weight, loss_BL, moe in trainer.pipeline.eval_token_losses(batches, trainer.val_split, trainer.step):
        if loss_BL is not None:
            add_losses(sums, data.domains_BL, loss_BL, weight)
        for index, out in moe.items():
            if out.segment_weights is not None:
                k = lory.index(index)
                add_domain_routing(sums.routing_KDE[k : k + 1], {index: out}, data.domains_BL, weight)
    group = trainer.groups.pp.group
    for tensor in (sums.loss_D, sums.count_D, sums.routing_KDE):
        if tensor.numel():
            dist.all_reduce(tensor, group=group)
    return sums
