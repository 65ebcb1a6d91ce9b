"""Autoregressive generation with a key/value cache (and Lory's prompt routing).

Shape legend: B sequences, L tokens, V vocabulary.
The prompt goes through the model once into an empty DecodeCache (prefill); then one token per
step attends to the cached keys and values. A Lory layer routes once from the mean of its input
over the prompt and reuses that merged FFN for every generated token (moe.generate_routing:
prompt), or re-routes at every segment boundary from the finished segment's mean (segment).
"""

from __future__ import annotations

import dataclasses

import torch

from megamoe.model.moe.lory import LoryFFN
from megamoe.model.moe.state import DecodeCache
from megamoe.model.transformer import Transformer


def set_generate_routing(model: Transformer, mode: str) -> None:
    """Override moe.generate_routing (prompt | segment) on every Lory layer."""
    if mode not in ("prompt", "segment"):
        raise ValueError(f"generate routing must be prompt or segment, got {mode!r}")
    for module in model.modules():
        if isinstance(module, LoryFFN):
            module.cfg = dataclasses.replace(module.cfg, generate_routing=mode)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0; else sampling from softmax(logits / temperature), optionally top-k only."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV.cpu(), 1, generator=gen).view(-1).to(logits_BV.device)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_BL: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
) -> torch.Tensor:
    """New tokens (B, ≤ max_new_tokens) after the prompt; stops early when every row produced stop_id.

    The context is model.cfg.seq_len tokens (prompt + generated); rotary tables end there.
    """
    length = prompt_BL.shape[1]
    if length == 0 or length >= model.cfg.seq_len:
        raise ValueError(f"the prompt has {length} tokens; it needs 1 to model.seq_len - 1 ({model.cfg.seq_len - 1})")
    steps = min(max_new_tokens, model.cfg.seq_len - length)
    gen = torch.Generator().manual_seed(seed)
    cache = DecodeCache()
    logits_BV = model(prompt_BL, cache=cache).logits_BLV[:, -1]
    done_B = torch.zeros(prompt_BL.shape[0], dtype=torch.bool, device=prompt_BL.device)
    out = []
    for step in range(steps):
        next_B = sample_next(logits_BV, temperature, top_k, gen)
        out.append(next_B)
        if stop_id is not None:
            done_B |= next_B == stop_id
            if bool(done_B.all()):
                break
        if step + 1 < steps:
            logits_BV = model(next_B[:, None], cache=cache).logits_BLV[:, -1]
    return torch.stack(out, 1) if out else prompt_BL.new_zeros(prompt_BL.shape[0], 0)
