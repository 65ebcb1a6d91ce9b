"""Routing oracles (algorithms.md §2.8, §5.5): capacity, priority, drops, expert choice, losses."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.config import load_config
from megamoe.model.moe.losses import balance_loss, z_loss
from megamoe.model.moe.routing import capacity, expert_capacity, route, token_choice
from megamoe.model.moe.tokens import TokenGroup


def moe(*overrides: str):
    """A MoEConfig (token choice unless overridden)."""
    return load_config(None, ["moe.routing=topk", *overrides]).moe


def test_capacity_formulas():
    cfg = moe("moe.num_experts=32", "moe.top_k=2")
    assert capacity(4096, cfg, 1.25, 2) == 320  # k·CF·G/E, ceil (megatron, ColossalAI-like)
    cfg = moe("moe.num_experts=32", "moe.top_k=2", "moe.capacity_formula=cf*G/E")
    assert capacity(4096, cfg, 1.25, 2) == 160  # CF·G/E (flaxformer, the released OpenMoE models)
    assert capacity(10, cfg, 1.0, 2) == 4  # min_capacity
    assert capacity(100, moe("moe.num_experts=8", "moe.min_capacity=1"), 1.0, 1) == 13  # ceil(12.5)


def test_expert_capacity_rounding():
    assert expert_capacity(100, 2.0, 8) == 25
    assert expert_capacity(10, 1.0, 4) == 2  # round(2.5) = 2 (banker's rounding, flaxformer's round)
    assert expert_capacity(3, 0.1, 8) == 1
    assert expert_capacity(4, 8.0, 2) == 4


def test_every_expert_within_capacity_and_rank_major_priority():
    torch.manual_seed(0)
    cfg = moe("moe.num_experts=4", "moe.top_k=2", "moe.min_capacity=1")
    logits = torch.randn(64, 4) * 3
    a = token_choice(logits, cfg, 2, 0.5)
    cap = capacity(64, cfg, 0.5, 2)
    assert torch.bincount(a.expert_A, minlength=4).max() <= cap
    requested, kept = a.requested_TK, a.kept_TK
    for e in range(4):
        first_dropped = (~kept[:, 0] & (requested[:, 0] == e)).any()
        second_served = (kept[:, 1] & (requested[:, 1] == e)).any()
        assert not (first_dropped and second_served), "a second choice served while a first choice was dropped"
        for rank in range(2):
            reqs = (requested[:, rank] == e).nonzero().flatten()
            kept_pos = reqs[kept[reqs, rank]]
            dropped_pos = reqs[~kept[reqs, rank]]
            if len(kept_pos) and len(dropped_pos):
                assert kept_pos.max() < dropped_pos.min(), "within a rank the latest positions are dropped"


def test_large_capacity_drops_nothing_and_matches_dropless():
    torch.manual_seed(1)
    cfg = moe("moe.num_experts=4")
    logits = torch.randn(32, 4)
    capped, dropless = token_choice(logits, cfg, 2, 100.0), token_choice(logits, cfg, 2, 0.0)
    assert capped.kept_TK.all()
    assert torch.equal(capped.expert_A, dropless.expert_A) and torch.equal(capped.weight_A, dropless.weight_A)


def test_repeated_token_drops_towards_the_end():
    """Identical tokens all pick the same expert: exactly the requests beyond capacity — the latest — drop."""
    cfg = moe("moe.num_experts=4", "moe.top_k=1", "moe.min_capacity=1")
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]]).repeat(40, 1)
    a = token_choice(logits, cfg, 1, 1.0)
    cap = capacity(40, cfg, 1.0, 1)
    assert cap == 10
    assert a.kept_TK[:, 0].tolist() == [True] * cap + [False] * (40 - cap)


def test_probs_policy_keeps_highest_scores():
    cfg = moe("moe.num_experts=2", "moe.top_k=1", "moe.min_capacity=1", "moe.drop_policy=probs")
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    a = token_choice(logits, cfg, 1, 1.0)  # capacity ceil(1·1·4/2) = 2 on expert 0
    assert a.kept_TK[:, 0].tolist() == [False, True, False, True]


def test_top1_position_priority_is_causal_for_drops():
    """Top-1: a later token can never cause an earlier token to be dropped."""
    torch.manual_seed(2)
    cfg = moe("moe.num_experts=4", "moe.top_k=1", "moe.min_capacity=1")
    logits = torch.randn(48, 4)
    base = token_choice(logits, cfg, 1, 0.6).kept_TK[:, 0]
    for t in range(0, 48, 7):
        changed = logits.clone()
        changed[t + 1 :] = torch.randn(47 - t, 4) * 5
        assert torch.equal(token_choice(changed, cfg, 1, 0.6).kept_TK[: t + 1, 0], base[: t + 1])


def test_top2_rank_major_capacity_is_not_causal():
    """The documented leak: a later token's first choice evicts an earlier token's second choice."""
    cfg = moe("moe.num_experts=2", "moe.top_k=2", "moe.min_capacity=1", "moe.capacity_formula=cf*G/E")
    early = torch.tensor([[1.0, 0.5]])  # token 0: first choice expert 0, second choice expert 1
    late_a, late_b = torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 0.5]])
    cf = 0.5  # capacity = max(1, ceil(0.5·2/2)) = 1 slot per expert
    kept_a = token_choice(torch.cat([early, late_a]), cfg, 2, cf).kept_TK
    kept_b = token_choice(torch.cat([early, late_b]), cfg, 2, cf).kept_TK
    assert kept_b[0, 1] and not kept_a[0, 1], "token 1's first choice of expert 1 evicted token 0's second choice"
    dropless = [token_choice(torch.cat([early, late]), cfg, 2, 0.0).kept_TK[0] for late in (late_a, late_b)]
    assert torch.equal(dropless[0], dropless[1]), "dropless routing is causal"


def test_renormalize_and_raw_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    raw = token_choice(logits, moe("moe.num_experts=4"), 2, 0.0).weight_A
    probs = logits.softmax(-1)[0]
    torch.testing.assert_close(raw, probs[:2])
    normed = token_choice(logits, moe("moe.num_experts=4", "moe.renormalize=true"), 2, 0.0).weight_A
    torch.testing.assert_close(normed, probs[:2] / probs[:2].sum())
    sig = token_choice(logits, moe("moe.num_experts=4", "moe.score_fn=sigmoid"), 2, 0.0).weight_A
    torch.testing.assert_close(sig, logits[0, :2].sigmoid())


def test_expert_choice_exact_capacity():
    torch.manual_seed(3)
    cfg = moe("moe.routing=expert_choice", "moe.num_experts=4", "moe.capacity_factor=2.0")
    a = route(torch.randn(40, 4), cfg, training=True)
    k_cap = expert_capacity(40, 2.0, 4)
    assert torch.bincount(a.expert_A, minlength=4).tolist() == [k_cap] * 4
    assert len(a.token_A) == 4 * k_cap
    assert a.requested_TK is None  # no balance loss for expert choice
    fallback = route(torch.randn(40, 4), cfg, training=False)
    assert fallback.requested_TK is not None and fallback.requested_TK.shape == (40, 2)  # top-round(c)


def test_balance_loss_minimum_is_k_alpha():
    cfg = moe("moe.num_experts=4", "moe.top_k=2", "moe.balance_loss_coef=0.01")
    tokens = 8
    requested = torch.stack([torch.arange(tokens) % 4, (torch.arange(tokens) + 1) % 4], dim=1)
    loss = balance_loss(torch.zeros(tokens, 4), requested, torch.zeros(tokens, dtype=torch.long), 1, cfg, TokenGroup())
    assert loss.item() == pytest.approx(2 * 0.01)
    seq = balance_loss(
        torch.zeros(tokens, 4),
        requested,
        torch.arange(tokens) % 2,
        2,
        moe("moe.num_experts=4", "moe.balance_loss_level=sequence"),
        TokenGroup(),
    )
    assert seq.item() == pytest.approx(0.02)


def test_balance_loss_gradient_only_through_probs():
    cfg = moe("moe.num_experts=4", "moe.top_k=1")
    logits = torch.randn(16, 4, requires_grad=True)
    requested = logits.argmax(-1, keepdim=True)
    balance_loss(logits, requested, torch.zeros(16, dtype=torch.long), 1, cfg, TokenGroup()).backward()
    f = torch.bincount(requested.flatten(), minlength=4).float() / 16
    p = logits.detach().softmax(-1)
    manual = 0.01 * 4 * f / 16  # d/dp_i of α·E·Σ f_i·mean(p_i)
    expected = p * (manual - (p * manual).sum(-1, keepdim=True))  # through the softmax Jacobian
    torch.testing.assert_close(logits.grad, expected)


def test_z_loss_on_zero_logits():
    cfg = moe("moe.num_experts=8", "moe.z_loss_coef=1.0")
    assert z_loss(torch.zeros(5, 8), cfg, TokenGroup()).item() == pytest.approx(math.log(8) ** 2)
