"""Incremental decoding: KV-cache logits equal full recomputation (dense, token choice, Lory prompt and
segment routing); Lory's prompt routing stays fixed while generating; generate()'s limits."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import ModelConfig, load_config
from megamoe.model import LayerFactory, build_model
from megamoe.model.generate import generate, sample_next, set_generate_routing
from megamoe.model.init import init_parameters
from megamoe.model.moe.lory import LoryDecode, LoryFFN
from megamoe.model.moe.state import DecodeCache, RoutingState

MODEL = ModelConfig(
    d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=24, vocab_size=50, ffn_hidden_size=20
)
LORY = ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=4", "moe.moe_every=1"]


def model_for(*overrides: str):
    """A seeded float64 model in eval mode."""
    moe = load_config(None, list(overrides)).moe
    return build_model(MODEL, 0, moe=moe).double().eval()


def decode(model, prompt, steps: int):
    """Greedy decoding through a cache: (all tokens fed, logits at every fed position, the cache)."""
    cache = DecodeCache()
    logits = [model(prompt, cache=cache).logits_BLV]
    tokens = prompt
    for _ in range(steps):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        logits.append(model(nxt, cache=cache).logits_BLV)
    return tokens, torch.cat(logits, 1), cache


@pytest.mark.parametrize(
    "overrides",
    [[], ["moe.routing=topk", "moe.num_experts=4", "moe.eval_capacity_factor=0"],
     [*LORY, "moe.generate_routing=segment"],
     [*LORY, "moe.generate_routing=segment", "moe.scorer=gru", "moe.gru_hidden=8"]],
    ids=["dense", "topk", "lory-segment", "lory-segment-gru"],
)  # fmt: skip
def test_cached_decoding_equals_the_full_forward(overrides):
    """Per-token routing, and Lory re-routing per segment with a prompt longer than T: exactly training-style."""
    model = model_for(*overrides)
    prompt = torch.randint(0, MODEL.vocab_size, (2, 6))
    tokens, incremental, _ = decode(model, prompt, 12)
    torch.testing.assert_close(incremental, model(tokens).logits_BLV, rtol=0, atol=1e-10)


@pytest.mark.parametrize("gru", [False, True])
def test_prompt_routing_is_fixed_and_cached_decoding_equals_recomputation(gru):
    """Prompt routing: weights set at prefill never change; logits = one full pass with those merged FFNs."""
    model = model_for(*LORY, *(["moe.scorer=gru", "moe.gru_hidden=8"] if gru else []))
    prompt = torch.randint(0, MODEL.vocab_size, (3, 7))
    cache = DecodeCache()
    model(prompt, cache=cache)
    weights = {i: d.weights_bE.clone() for i, d in cache.lory.items()}
    assert sorted(weights) == [0, 1]
    tokens, incremental, cache = decode(model, prompt, 10)
    for i, dec in cache.lory.items():
        assert torch.equal(dec.weights_bE, weights[i])
    fixed = DecodeCache(lory={i: LoryDecode(w, 0, torch.zeros(3, MODEL.d_model)) for i, w in weights.items()})
    torch.testing.assert_close(incremental, model(tokens, cache=fixed).logits_BLV, rtol=0, atol=1e-10)


def test_prompt_weights_come_from_the_prompt_mean():
    layer = LoryFFN(MODEL, load_config(None, LORY).moe, LayerFactory()).double()
    init_parameters(layer, MODEL, 0)
    x = torch.randn(9, 2, MODEL.d_model, dtype=torch.float64)
    state = RoutingState(cache=DecodeCache())
    layer(x, state)
    expected = layer.scorer.router(x.mean(0)).softmax(-1)
    torch.testing.assert_close(state.cache.lory[0].weights_bE, expected)


def test_set_generate_routing_and_greedy_generate():
    model = model_for(*LORY)
    set_generate_routing(model, "segment")
    assert all(layer.ffn.cfg.generate_routing == "segment" for layer in model.layers)
    prompt = torch.randint(0, MODEL.vocab_size, (2, 5))
    new = generate(model, prompt, 100)
    assert new.shape == (2, MODEL.seq_len - 5), "capped at the context length"
    tokens, _, _ = decode(model, prompt, new.shape[1])
    torch.testing.assert_close(new, tokens[:, 5:])
    with pytest.raises(ValueError, match=r"needs 1 to model\.seq_len - 1"):
        generate(model, torch.zeros(1, MODEL.seq_len, dtype=torch.long), 3)


def test_sampling_respects_top_k_and_seed():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]]).expand(500, -1)
    draws = sample_next(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    again = sample_next(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert sample_next(logits[:1], 0.0, 0, None).item() == 1
