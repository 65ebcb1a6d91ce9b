"""Validation loss, perplexity and per-domain perplexity over a fixed slice of the val split.

Shape legend: B batch, L sequence, D domains.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from megamoe.data import PackedSplit


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


@torch.no_grad()
def eval_sums(
    model: nn.Module,
    split: PackedSplit,
    batches: list[tuple[np.ndarray, float]],
    seq_len: int,
    num_domains: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted summed token loss and token count per domain (float64, on CPU) over (ids, weight) batches."""
    was_training = model.training
    model.eval()
    loss_sum_D = torch.zeros(num_domains, dtype=torch.float64)
    count_D = torch.zeros(num_domains, dtype=torch.float64)
    for ids, weight in batches:
        batch = split.batch(ids, seq_len)
        out = model(batch.tokens_BL.to(device), batch.targets_BL.to(device))
        domains = batch.domains_BL.flatten()
        loss_sum_D += weight * torch.bincount(domains, out.token_loss_BL.flatten().double().cpu(), num_domains)
        count_D += weight * torch.bincount(domains, minlength=num_domains).double()
    model.train(was_training)
    return loss_sum_D, count_D


def eval_metrics(loss_sum_D: torch.Tensor, count_D: torch.Tensor, domains: list[str]) -> dict[str, float]:
    """eval/loss, eval/ppl and eval/ppl/<domain> for every domain present."""
    loss = float(loss_sum_D.sum() / count_D.sum())
    metrics = {"eval/loss": loss, "eval/ppl": math.exp(loss)}
    for d, name in enumerate(domains):
        if count_D[d] > 0:
            metrics[f"eval/ppl/{name}"] = math.exp(float(loss_sum_D[d] / count_D[d]))
    return metrics
