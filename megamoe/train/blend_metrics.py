"""What a run on a weighted blend (data.blend) evaluates and logs beyond a single-source run.

Shape legend: K sources, D domains (the blend's: every source's, source after source).
Each source is evaluated on its own validation split (the same evenly spread slice a
single-source run of it would read: train.eval_batches micro-batches per source). The overall
eval/loss is the blend-weighted mean of the sources' losses, Σ_k w_k·loss_k: the expected loss on
the training mixture, whatever the sizes of the validation splits.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megamoe.data import BlendedSplit, BlendSampler, PreparedBlend
from megamoe.train.evaluate import eval_indices


def blend_eval_indices(val: BlendedSplit, seq_len: int, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """Every source's own eval slice (eval_indices of its val split) in blend ids; no batch mixes sources."""
    offsets_K = val.offsets(seq_len)
    return [
        ids + offset
        for part, offset in zip(val.parts, offsets_K)
        for ids in eval_indices(part, seq_len, batch_size, num_batches)
    ]


def blend_eval_metrics(loss_sum_D: torch.Tensor, count_D: torch.Tensor, blend: PreparedBlend) -> dict[str, float]:
    """eval/<source>/loss and /ppl per source, and eval/loss, eval/ppl weighted by the blend."""
    metrics, total = {}, 0.0
    for part, (lo, hi) in zip(blend.parts, blend.domain_ranges()):
        loss = float(loss_sum_D[lo:hi].sum() / count_D[lo:hi].sum())
        metrics[f"eval/{part.name}/loss"], metrics[f"eval/{part.name}/ppl"] = loss, math.exp(loss)
        total += part.weight * loss
    return metrics | {"eval/loss": total, "eval/ppl": math.exp(total)}


def share_metrics(sampler: BlendSampler, blend: PreparedBlend, samples: int) -> dict[str, float]:
    """data/share/<source>: each source's share of the samples (= tokens) trained on so far."""
    shares_K = sampler.shares(samples)
    return {f"data/share/{part.name}": float(share) for part, share in zip(blend.parts, shares_K)}


def describe_blend(blend: PreparedBlend, train: BlendedSplit, seq_len: int, samples: int) -> str:
    """One log line: each source's weight, train tokens and sequences, and the epochs its share of the run reads."""
    rows = []
    for part, split in zip(blend.parts, train.parts):
        sequences = split.num_sequences(seq_len)
        epochs = part.weight * samples / sequences
        rows.append(
            f"{part.name} w={part.weight:.3f} ({len(split.tokens):,} train tokens, {sequences:,} sequences, "
            f"~{epochs:.2f} epochs)"
        )
    return "data blend: " + "; ".join(rows)
