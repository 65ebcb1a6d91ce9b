"""Validation loss, perplexity and per-domain perplexity over a fixed slice of the val split.

Shape legend: B batch, L sequence, D domains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from megamoe.data import PackedSplit
from megamoe.train.domain_routing import add_domain_routing


def rank_share(batches: list[np.ndarray], rank: int, ranks: int) -> list[tuple[np.ndarray, float]]:
    """This data-parallel rank's batches with weight 1, padded with weight-0 repeats to the same count on
    every rank: ranks exchange tokens inside a forward pass (expert parallelism), so all must run it."""
    mine = [(ids, 1.0) for ids in batches[rank::ranks]]
    per_rank = -(-len(batches) // ranks)
    return mine + [(batches[0], 0.0)] * (per_rank - len(mine))


def eval_indices(split: PackedSplit, seq_len: int, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """The val sequences every evaluation reads: batch_size·num_batches of them, evenly spread."""
    available = split.num_sequences(seq_len)
    wanted = min(available, batch_size * num_batches)
    ids = np.unique(np.linspace(0, available - 1, wanted).round().astype(np.int64))
    return [ids[s : s + batch_size] for s in range(0, len(ids), batch_size)]


def spread_batches(split: PackedSplit, seq_len: int, count: int, batch_size: int) -> list[np.ndarray]:
    """count val sequences evenly spread (the trainer's choice for the same count), in batches of batch_size."""
    ids = eval_indices(split, seq_len, count, 1)[0]
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


@dataclass
class EvalSums:
    """Per-domain sums of one evaluation (float64, CPU), to be summed over the data-parallel ranks."""

    loss_D: torch.Tensor
    """Summed token loss per domain."""
    count_D: torch.Tensor
    """Tokens per domain."""
    routing_KDE: torch.Tensor
    """Lory: per-token routing weights summed per (Lory layer, domain); (0, D, E) without Lory."""

    def reduced(self, reduce) -> EvalSums:
        """Every sum passed through reduce (e.g. a sum over the data-parallel ranks)."""
        routing = reduce(self.routing_KDE) if self.routing_KDE.numel() else self.routing_KDE
        return EvalSums(reduce(self.loss_D), reduce(self.count_D), routing)


@torch.no_grad()
def eval_sums(
    model: nn.Module,
    split: PackedSplit,
    batches: list[tuple[np.ndarray, float]],
    seq_len: int,
    num_domains: int,
    device: torch.device,
) -> EvalSums:
    """Weighted loss, token count and (Lory) routing sums per domain over (ids, weight) batches."""
    was_training = model.training
    model.eval()
    zeros_D = torch.zeros(num_domains, dtype=torch.float64)
    sums = EvalSums(zeros_D.clone(), zeros_D.clone(), _routing_zeros(model, num_domains))
    for ids, weight in batches:
        batch = split.batch(ids, seq_len)
        out = model(batch.tokens_BL.to(device), batch.targets_BL.to(device))
        add_losses(sums, batch.domains_BL, out.token_loss_BL, weight)
        if sums.routing_KDE.numel():
            add_domain_routing(sums.routing_KDE, out.moe, batch.domains_BL, weight)
    model.train(was_training)
    return sums


def add_losses(sums: EvalSums, domains_BL: torch.Tensor, token_loss_BL: torch.Tensor, weight: float) -> None:
    """Add one batch's weighted token losses and token counts to their domains' sums."""
    domains, num_domains = domains_BL.flatten(), len(sums.loss_D)
    sums.loss_D += weight * torch.bincount(domains, token_loss_BL.flatten().double().cpu(), num_domains)
    sums.count_D += weight * torch.bincount(domains, minlength=num_domains).double()


def lory_layers(model: nn.Module) -> list[int]:
    """Block indices of the Lory layers."""
    from megamoe.model.moe.lory import LoryFFN

    layers = getattr(model, "layers", ())
    return [i for i, block in enumerate(layers) if isinstance(getattr(block, "ffn", None), LoryFFN)]


def _routing_zeros(model: nn.Module, num_domains: int) -> torch.Tensor:
    """Zeroed (Lory layers, domains, experts) sums."""
    layers = lory_layers(model)
    experts = model.moe_cfg.num_experts if layers else 0
    return torch.zeros(len(layers), num_domains, experts, dtype=torch.float64)


def eval_metrics(loss_sum_D: torch.Tensor, count_D: torch.Tensor, domains: list[str]) -> dict[str, float]:
    """eval/loss, eval/ppl and eval/ppl/<domain> for every domain present."""
    loss = float(loss_sum_D.sum() / count_D.sum())
    metrics = {"eval/loss": loss, "eval/ppl": math.exp(loss)}
    for d, name in enumerate(domains):
        if count_D[d] > 0:
            metrics[f"eval/ppl/{name}"] = math.exp(float(loss_sum_D[d] / count_D[d]))
    return metrics
