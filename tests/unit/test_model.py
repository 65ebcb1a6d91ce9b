"""Model: shapes, causality, grouped-query attention, tying, init, parameter counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig
from megamoe.model import build_model
from megamoe.model.layers import Rotary
from megamoe.model.params import count_parameters, meta_counts

BASE = ModelConfig(d_model=64, num_layers=2, num_heads=4, seq_len=16, vocab_size=96)


def cfg_with(**kw) -> ModelConfig:
    """BASE with some fields replaced."""
    return dataclasses.replace(BASE, **kw)


@pytest.mark.parametrize("kv_heads", [0, 2, 1])
@pytest.mark.parametrize("tie", [False, True])
def test_shapes_and_loss(kv_heads, tie):
    cfg = cfg_with(num_kv_heads=kv_heads, tie_embeddings=tie)
    model = build_model(cfg, seed=0)
    tokens, targets = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    out = model(tokens, targets)
    assert out.logits_BLV.shape == (3, 16, 96)
    assert out.token_loss_BL.shape == (3, 16) and out.token_loss_BL.dtype == torch.float32
    assert out.loss.item() == pytest.approx(math.log(96), rel=0.05)  # near-uniform at init


@pytest.mark.parametrize("kv_heads", [0, 2])
def test_causality(kv_heads):
    """Changing token t leaves the logits of positions < t unchanged (and changes position t)."""
    model = build_model(cfg_with(num_kv_heads=kv_heads), seed=1)
    tokens = torch.randint(0, 96, (2, 16))
    for t in (1, 7, 15):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 96
        a, b = model(tokens).logits_BLV, model(changed).logits_BLV
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
        assert not torch.allclose(a[:, t], b[:, t])


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals the MHA model whose K/V heads are copies of each group's shared ones."""
    gqa = build_model(cfg_with(num_kv_heads=2), seed=2)
    mha = build_model(cfg_with(num_kv_heads=0), seed=2)
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"layers.{i}.attn.qkv.weight"].view(2, 4, 16, 64)  # group, [q0, q1, k, v], head row, in
        heads = [torch.stack([w[g, j], w[g, 2], w[g, 3]]) for g in range(2) for j in range(2)]
        state[f"layers.{i}.attn.qkv.weight"] = torch.stack(heads).reshape(4 * 3 * 16, 64)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(gqa(tokens).logits_BLV, mha(tokens).logits_BLV, rtol=1e-5, atol=1e-5)


def test_rotary_is_relative():
    """<R(m)q, R(n)k> depends only on m - n."""
    rot = Rotary(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    at = lambda x, pos: rot(x.expand(1, 1, pos + 1, 8).contiguous())[:, :, pos]  # noqa: E731
    assert torch.dot(at(q, 5)[0, 0], at(k, 3)[0, 0]).item() == pytest.approx(
        torch.dot(at(q, 12)[0, 0], at(k, 10)[0, 0]).item(), abs=1e-5
    )


def test_tied_embeddings_share_storage():
    model = build_model(cfg_with(tie_embeddings=True), seed=0)
    assert not list(model.lm_head.parameters())
    assert "lm_head.weight" not in model.state_dict()
    tokens = torch.randint(0, 96, (1, 16))
    model(tokens, tokens).loss.backward()
    assert model.embed.weight.grad is not None
    h = model.norm(torch.randn(1, 1, 64))
    torch.testing.assert_close(model.lm_head(h, model.embed.weight), F.linear(h, model.embed.weight))


def test_init_is_megatron_style_and_seeded():
    cfg = cfg_with(d_model=256, num_heads=4, num_layers=8, vocab_size=1024)
    model = build_model(cfg, seed=3)
    params = dict(model.named_parameters())
    assert params["layers.0.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["layers.0.ffn.down.weight"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert params["layers.0.attn.proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(params["norm.weight"] == 1)
    again = build_model(cfg, seed=3)
    other = build_model(cfg, seed=4)
    assert torch.equal(again.layers[3].ffn.up.weight, model.layers[3].ffn.up.weight)
    assert not torch.equal(other.layers[3].ffn.up.weight, model.layers[3].ffn.up.weight)
    assert not torch.equal(model.layers[0].ffn.up.weight, model.layers[1].ffn.up.weight)


def test_parameter_count_formula():
    for cfg in (cfg_with(num_kv_heads=2), cfg_with(tie_embeddings=True), cfg_with(ffn_hidden_size=100)):
        d, f, v, hd = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.head_dim
        attn = d * (cfg.num_heads + 2 * cfg.kv_heads) * hd + cfg.num_heads * hd * d
        per_layer = attn + 3 * d * f + 2 * d
        expected = v * d + cfg.num_layers * per_layer + d + (0 if cfg.tie_embeddings else v * d)
        counts = meta_counts(cfg)
        assert counts.total == expected == count_parameters(build_model(cfg, 0)).total
        assert counts.active == counts.total and counts.embedding == v * d
