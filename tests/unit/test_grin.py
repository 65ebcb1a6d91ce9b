"""GRIN / SparseMixer-v2 oracles (algorithms.md §4.10) and its layout-independent randomness."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.config import load_config
from megamoe.model.moe.dispatch import combine, sort_by_expert
from megamoe.model.moe.noise import RoutingContext, uniform
from megamoe.model.moe.routing import relative_threshold_mask, sparsemixer
from megamoe.ops.reference import sparsemixer_weight_st
from megamoe.ops.sparsemixer import sparsemixer_weight


def cfg(*overrides: str):
    """A SparseMixer-v2 MoE section."""
    return load_config(None, ["moe.routing=sparsemixer", *overrides]).moe


def fixed(gumbel: list[list[list[float]]], heun: list[list[float]]):
    """A draw that returns given uniforms (one row per token)."""
    table = {"gumbel": torch.tensor(gumbel), "heun": torch.tensor(heun)}
    return lambda kind, shape: table[kind]


P1, P2 = 0.5249791874789399, 0.47502081252106  # softmax(1.0, 0.9)
JAC = P1 * (1 - P1)  # 0.249376


def test_worked_case_argmax():
    """z = (1.0, 0.9), ε = 0.1, top-1, D = argmax: weight p_1 exactly, ∂z = g·(0.249376, -0.249376)."""
    logits = torch.tensor([[1.0, 0.9]], requires_grad=True)
    a = sparsemixer(logits, cfg("moe.num_experts=2", "moe.top_k=1", "moe.jitter_eps=0.1"), False, None)
    assert a.expert_A.tolist() == [0] and a.weight_A.item() == pytest.approx(P1, abs=1e-7)
    a.weight_A.backward(torch.tensor([2.0]))  # g = 2
    torch.testing.assert_close(logits.grad, torch.tensor([[2 * JAC, -2 * JAC]]))


@pytest.mark.parametrize(("heun", "omega"), [(0.9, 1.0), (0.1, 1 / 3)])
def test_worked_case_second_expert_sampled(heun, omega):
    """D = 2 sampled: forward p_2·ω; router gradient g·(-0.249376, +0.249376) whatever ω."""
    logits = torch.tensor([[1.0, 0.9]], requires_grad=True)
    draw = fixed([[[1e-9, 1 - 1e-9]]], [[heun]])  # Gumbel noise that makes expert 2 win
    a = sparsemixer(logits, cfg("moe.num_experts=2", "moe.top_k=1", "moe.jitter_eps=0.1"), True, draw)
    assert a.expert_A.tolist() == [1]
    assert a.weight_A.item() == pytest.approx(P2 * omega, abs=1e-7)
    a.weight_A.backward(torch.tensor([1.0]))
    torch.testing.assert_close(logits.grad, torch.tensor([[-JAC, JAC]]))


@pytest.mark.parametrize(("scaled", "expected"), [(True, P2 / 3), (False, P2)])
def test_expert_gradient_scaling_flag(scaled, expected):
    """Released code scales the expert gradient by ω; Algorithm 1 does not."""
    logits = torch.tensor([[1.0, 0.9]])
    c = cfg(
        "moe.num_experts=2", "moe.top_k=1", "moe.jitter_eps=0.1", f"moe.omega_scales_expert_grad={str(scaled).lower()}"
    )
    a = sparsemixer(logits, c, True, fixed([[[1e-9, 1 - 1e-9]]], [[0.1]]))
    y = torch.ones(1, 3, requires_grad=True)
    out = combine(y, sort_by_expert(a), 1)
    torch.testing.assert_close(out, torch.full((1, 3), P2 / 3))  # the forward always carries ω
    out.sum().backward()
    torch.testing.assert_close(y.grad, torch.full((1, 3), expected))


def test_masking_case():
    """z = (1.0, 0.5, -3.0), ε = 0.1: round 1 keeps only expert 1 (weight 1, no router gradient), round 2 expert 2."""
    logits = torch.tensor([[1.0, 0.5, -3.0]], requires_grad=True)
    c = cfg("moe.num_experts=3", "moe.top_k=2", "moe.jitter_eps=0.1")
    assert relative_threshold_mask(logits.detach(), 0.1).tolist() == [[False, True, True]]
    a = sparsemixer(logits, c, False, None)
    assert a.expert_A.tolist() == [0, 1] and a.weight_A.tolist() == [1.0, 1.0]  # weights sum to 2, not renormalized
    a.weight_A.sum().backward()
    assert torch.equal(logits.grad, torch.zeros(1, 3))


def test_sampling_frequencies():
    """P(D = i) = p_i (masked softmax); among non-argmax draws ω = 1 a quarter of the time."""
    torch.manual_seed(0)
    n = 40000
    logits = torch.tensor([[0.6, 0.5, 0.4, 0.45]]).expand(n, 4)
    a = sparsemixer(logits, cfg("moe.num_experts=4", "moe.top_k=1", "moe.jitter_eps=0.5"), True, None)
    p = logits[0].softmax(-1)
    freq = torch.bincount(a.expert_A, minlength=4).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4 * sigma).all(), (freq, p)
    non_argmax = a.expert_A != 0
    omega_one = (a.weight_A[non_argmax] / p[a.expert_A[non_argmax]] - 1).abs() < 1e-5
    m = int(non_argmax.sum())
    assert abs(omega_one.float().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / m)


def test_logit_gradient_sums_to_zero_and_matches_reference():
    torch.manual_seed(1)
    logits = torch.randn(64, 8, requires_grad=True)
    c = cfg("moe.num_experts=8", "moe.top_k=2", "moe.jitter_eps=0.3")
    a = sparsemixer(logits, c, True, None)
    a.weight_A.backward(torch.randn(len(a.weight_A)))
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(64), atol=1e-6, rtol=0)


def test_custom_op_equals_straight_through_reference():
    torch.manual_seed(2)
    logits = torch.randn(32, 6)
    mask = relative_threshold_mask(logits, 0.2)
    probs = logits.masked_fill(mask, float("-inf")).softmax(-1)
    chosen = torch.multinomial(probs, 1).squeeze(1)
    omega = torch.where(torch.rand(32) > 0.5, 1.0, 1 / 3)
    grad = torch.randn(32)
    la, lb = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast, ref = sparsemixer_weight(la, probs, chosen, omega), sparsemixer_weight_st(lb, mask, chosen, omega)
    (fast * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(la.grad, lb.grad)


def test_eval_is_deterministic_greedy_with_per_round_masked_weights():
    torch.manual_seed(3)
    logits = torch.randn(16, 5)
    c = cfg("moe.num_experts=5", "moe.top_k=2", "moe.jitter_eps=0.2")
    a, b = sparsemixer(logits, c, False, None), sparsemixer(logits, c, False, None)
    assert torch.equal(a.expert_A, b.expert_A) and torch.equal(a.weight_A, b.weight_A)
    first = logits.argmax(-1)
    rest = logits.scatter(1, first[:, None], float("-inf"))
    second = rest.argmax(-1)
    assert a.requested_TK.tolist() == torch.stack([first, second], 1).tolist()
    w1 = logits.masked_fill(relative_threshold_mask(logits, 0.2), float("-inf")).softmax(-1).gather(1, first[:, None])
    w2 = rest.masked_fill(relative_threshold_mask(rest, 0.2), float("-inf")).softmax(-1).gather(1, second[:, None])
    torch.testing.assert_close(a.weight_A.view(16, 2), torch.cat([w1, w2], 1))


def test_draws_are_layout_independent():
    """A token's draw depends on (seed, step, layer, sample id, position), not on which rank routes it."""
    ctx = RoutingContext(seed=5, step=3, sample_ids=(10, 11))
    full = uniform(ctx, 2, "gumbel", (0, 8, 8), 2, (4,), torch.device("cpu"))
    for first in (0, 4):  # two "TP ranks" each routing half the sequence
        torch.testing.assert_close(
            uniform(ctx, 2, "gumbel", (first, 4, 8), 2, (4,), torch.device("cpu")), full[first : first + 4]
        )
    solo = uniform(RoutingContext(5, 3, (11,)), 2, "gumbel", (0, 8, 8), 1, (4,), torch.device("cpu"))
    torch.testing.assert_close(solo[:, 0], full[:, 1])  # another DP split of the same sequence
    other = uniform(RoutingContext(5, 4, (10, 11)), 2, "gumbel", (0, 8, 8), 2, (4,), torch.device("cpu"))
    assert not torch.equal(other, full)


def test_sparsemixer_config_rules():
    from megamoe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"moe\.capacity_factor: sparsemixer is dropless"):
        cfg("moe.capacity_factor=1.0")
    with pytest.raises(ConfigError, match=r"moe\.renormalize: sparsemixer weights"):
        cfg("moe.renormalize=true")
    assert cfg().balance_level == "global"
    assert load_config(None, ["moe.routing=topk"]).moe.balance_level == "micro_batch"
