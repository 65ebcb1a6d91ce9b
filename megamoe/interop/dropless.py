"""Capacity vs dropless: transformers' MoE classes drop nothing, so an export is dropless.

Shape legend: B sequences, L tokens. A model whose evaluation used a capacity (moe.eval_capacity_factor
> 0) computes a different function once dropless; the change is measured on the run's validation
sequences as the mean absolute change of the per-token loss, in nats, and an export is refused
beyond the user's tolerance.
"""

from __future__ import annotations

import dataclasses

import torch

from megamoe.config import Config
from megamoe.model import Transformer


def uses_capacity_in_eval(model: Transformer) -> bool:
    """The model drops tokens in evaluation (token choice, or expert choice's causal fallback)."""
    moe = model.moe_cfg
    return moe.routing in ("topk", "expert_choice") and moe.eval_capacity_factor > 0


def make_dropless(model: Transformer) -> None:
    """Evaluation without capacity, in every MoE block and in the model's own config."""
    model.moe_cfg = dataclasses.replace(model.moe_cfg, eval_capacity_factor=0.0)
    for module in model.modules():
        if module is not model and isinstance(getattr(module, "cfg", None), type(model.moe_cfg)):
            module.cfg = dataclasses.replace(module.cfg, eval_capacity_factor=0.0)


@torch.no_grad()
def dropless_change(model: Transformer, cfg: Config, sequences: int = 8) -> float:
    """Mean |Δ per-token loss| (nats) from capacity to dropless on validation sequences; the model ends dropless."""
    from megamoe.data import prepare_data
    from megamoe.train.evaluate import spread_batches

    split = prepare_data(cfg.data, progress=False).split("val")
    seq_len = cfg.model.seq_len
    ids = spread_batches(split, seq_len, min(sequences, split.num_sequences(seq_len)), sequences)[0]
    batch = split.batch(ids, seq_len)
    capped_BL = model(batch.tokens_BL, batch.targets_BL).token_loss_BL
    make_dropless(model)
    free_BL = model(batch.tokens_BL, batch.targets_BL).token_loss_BL
    return float((capped_BL - free_BL).abs().mean())
