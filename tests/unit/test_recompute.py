"""Activation recompute: losses and gradients equal those without it on every routing family, with less saved.

Exactness: the non-reentrant checkpoint re-runs the same ops on the same inputs in fp32 on one CPU
thread pool, so the comparison is bitwise (rtol = atol = 0). A planted bug (RMoE's recompute
starting from the GRU state the last block left) breaks it (test_stale_gru_state_is_caught).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model import build_model
from megamoe.model.moe.noise import RoutingContext
from megamoe.model.recompute import set_recompute

MODEL = ModelConfig(vocab_size=96, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, seq_len=24)
FAMILIES = {
    "dense": MoEConfig(),
    "topk-capacity-jitter": MoEConfig(routing="topk", num_experts=4, capacity_factor=1.0, input_jitter_eps=0.1,
                                      num_shared_experts=1, residual=True),
    "expert-choice": MoEConfig(routing="expert_choice", num_experts=4, capacity_factor=2.0),
    "grin": MoEConfig(routing="sparsemixer", num_experts=4, jitter_eps=0.3),
    "rmoe": MoEConfig(routing="topk", scorer="gru", gru_hidden=16, num_experts=4),
    "lory": MoEConfig(routing="lory", num_experts=4, segment_length=8, dense_warmup_fraction=0.0),
}  # fmt: skip


def loss_and_grads(model, tokens_BL, ctx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss (CE + aux) and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(tokens_BL[:, :-1], tokens_BL[:, 1:], ctx=ctx)
    loss = out.loss + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, tokens_BL, ctx) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens_BL[:, :-1], tokens_BL[:, 1:], ctx=ctx)
        (out.loss + out.aux_loss).backward()
    return total


@pytest.fixture
def tokens():
    """Four sequences of 25 tokens."""
    return torch.randint(0, MODEL.vocab_size, (4, MODEL.seq_len + 1), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recompute_is_exact(family, mode, tokens):
    """Loss and every gradient equal the run without recompute, bit for bit; fewer bytes are saved."""
    model = build_model(MODEL, 0, moe=FAMILIES[family]).train()
    ctx = RoutingContext(seed=7, step=3, sample_ids=(0, 1, 2, 3))
    ref_loss, ref_grads = loss_and_grads(model, tokens, ctx)
    ref_bytes = saved_bytes(model, tokens, ctx)
    set_recompute(model, mode)
    loss, grads = loss_and_grads(model, tokens, ctx)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)
    assert saved_bytes(model, tokens, ctx) < ref_bytes


def test_default_rng_draws_repeat_in_recompute(tokens):
    """Without a routing context GRIN samples from torch's RNG: the checkpoint restores it for the recompute."""
    model = build_model(MODEL, 0, moe=FAMILIES["grin"]).train()
    torch.manual_seed(5)
    ref_loss, ref_grads = loss_and_grads(model, tokens, None)
    set_recompute(model, "full")
    torch.manual_seed(5)
    loss, grads = loss_and_grads(model, tokens, None)
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)


def test_stale_gru_state_is_caught(tokens, monkeypatch):
    """Planted bug: recompute each RMoE block from the state the forward pass ended with → gradients differ."""
    from megamoe.model import recompute

    model = build_model(MODEL, 0, moe=FAMILIES["rmoe"]).train()
    ctx = RoutingContext(seed=7, step=3, sample_ids=(0, 1, 2, 3))
    _, ref_grads = loss_and_grads(model, tokens, ctx)
    set_recompute(model, "full")

    def stale(layer, rotary, state, x_LBD, h_TP):  # reads the shared, later-mutated state.h_TP
        y_LBD, aux = layer(x_LBD, rotary, state)
        return y_LBD, aux, state.h_TP

    monkeypatch.setattr(recompute, "_block_with_state", stale)
    with pytest.raises((AssertionError, RuntimeError)):
        _, grads = loss_and_grads(model, tokens, ctx)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)


def test_recompute_is_off_in_eval_and_decode(tokens):
    """No checkpoint without autograd: eval outputs equal and generation works under every mode."""
    from megamoe.model.generate import generate

    model = build_model(MODEL, 0, moe=dataclasses.replace(FAMILIES["lory"])).eval()
    with torch.no_grad():
        ref = model(tokens[:, :-1]).logits_BLV
    ref_gen = generate(model, tokens[:1, :5], 8)
    set_recompute(model, "full")
    with torch.no_grad():
        assert torch.equal(model(tokens[:, :-1]).logits_BLV, ref)
    assert torch.equal(generate(model, tokens[:1, :5], 8), ref_gen)
    with pytest.raises(ValueError, match=r"train\.recompute"):
        set_recompute(model, "partial")
