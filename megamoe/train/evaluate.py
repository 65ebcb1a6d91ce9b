"""Validation loss, perplexity and per-domain perplexity over a fixed slice of the val split.

Shape legend: B batch, L sequence, D domains.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from megamoe.data import PackedSplit


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
    batches: list[np.ndarray],
    seq_len: int,
    num_domains: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and token count per domain (float64, on CPU)."""
    was_training = model.training
    model.eval()
    loss_sum_D = torch.zeros(num_domains, dtype=torch.float64)
    count_D = torch.zeros(num_domains, dtype=torch.float64)
    for ids in batches:
        batch = split.batch(ids, seq_len)
        out = model(batch.tokens_BL.to(device), batch.targets_BL.to(device))
        domains = batch.domains_BL.flatten()
        loss_sum_D += torch.bincount(domains, out.token_loss_BL.flatten().double().cpu(), num_domains)
        count_D += torch.bincount(domains, minlength=num_domains).double()
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
