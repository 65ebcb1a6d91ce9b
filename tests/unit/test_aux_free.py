"""Auxiliary-loss-free balancing and group-limited routing: hand-computed oracles (ties included), config."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.config import load_config
from megamoe.errors import ConfigError
from megamoe.model.factory import LayerFactory
from megamoe.model.moe import MoEFFN
from megamoe.model.moe.balance import bias_step, expert_biases
from megamoe.model.moe.routing import group_limited, token_choice


def moe(*overrides: str):
    """A token-choice MoEConfig."""
    return load_config(None, ["moe.routing=topk", *overrides]).moe


def logit(p: float) -> float:
    """The logit whose sigmoid is p."""
    return math.log(p / (1 - p))


def test_bias_steers_selection_and_weights_stay_unbiased():
    """V3: top-k by sigmoid + bias; weights = the unbiased sigmoids renormalized over the chosen, × routed scaling."""
    cfg = moe("moe.num_experts=4", "moe.top_k=2", "moe.score_fn=sigmoid", "moe.renormalize=true",
              "moe.balance=aux_free", "moe.routed_scaling=2.5")  # fmt: skip
    logits = torch.tensor([[2.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    bias = torch.tensor([-0.3, -0.1, 0.1, 0.0])
    a = token_choice(logits, cfg, 2, 0.0, bias)
    s0 = 1 / (1 + math.exp(-2.0))
    # token 0: choice [s0-0.3=0.581, 0.4, 0.6, 0.269] -> experts 2, 0 (the tie s1 = s2 = 0.5 broken by the bias)
    # token 1: all scores 0.5; choice [0.2, 0.4, 0.6, 0.5] -> experts 2, 3; weights 0.5/1.0 each
    assert a.requested_TK.tolist() == [[2, 0], [2, 3]]
    want = [2.5 * 0.5 / (0.5 + s0), 2.5 * s0 / (0.5 + s0), 1.25, 1.25]
    torch.testing.assert_close(a.weight_A, torch.tensor(want), rtol=1e-6, atol=0)
    (a.weight_A * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()  # through the chosen unbiased scores only
    assert logits.grad[0, 1] == 0 and logits.grad[0, 3] == 0 and logits.grad[0, 0] != 0 and logits.grad[0, 2] != 0
    assert token_choice(logits, cfg, 2, 0.0).requested_TK[0, 0] == 0  # unbiased, expert 0 comes first


def test_zero_bias_is_plain_top_k():
    torch.manual_seed(0)
    cfg = moe("moe.num_experts=8", "moe.top_k=2", "moe.balance=aux_free")
    logits = torch.randn(32, 8)
    a, b = token_choice(logits, cfg, 2, 0.0, torch.zeros(8)), token_choice(logits, cfg, 2, 0.0)
    assert torch.equal(a.requested_TK, b.requested_TK) and torch.equal(a.weight_A, b.weight_A)


def test_group_limited_oracle():
    """8 experts in 4 groups of 2, top-4 from the top 2 groups by the sum of each group's top-(4/2) scores."""
    cfg = moe("moe.num_experts=8", "moe.top_k=4", "moe.num_groups=4", "moe.topk_groups=2")
    choice = torch.tensor([[0.9, 0.1, 0.5, 0.45, 0.8, 0.0, 0.7, 0.6]])
    # group sums [1.0, 0.95, 0.8, 1.3] -> groups 3 and 0 -> experts {0, 1, 6, 7}; unlimited top-4 is {0, 4, 6, 7}
    masked = group_limited(choice, cfg, 4)
    assert torch.isinf(masked[0, 2:6]).all() and torch.equal(masked[0, [0, 1, 6, 7]], choice[0, [0, 1, 6, 7]])
    logits = torch.tensor([[logit(p) if p > 0 else -30.0 for p in choice[0].tolist()]])
    sig = moe("moe.num_experts=8", "moe.top_k=4", "moe.num_groups=4", "moe.topk_groups=2", "moe.score_fn=sigmoid")
    assert sorted(token_choice(logits, sig, 4, 0.0).requested_TK[0].tolist()) == [0, 1, 6, 7]
    free = moe("moe.num_experts=8", "moe.top_k=4", "moe.score_fn=sigmoid")
    assert sorted(token_choice(logits, free, 4, 0.0).requested_TK[0].tolist()) == [0, 4, 6, 7]


def test_group_ties_keep_the_lower_group_and_bias_moves_groups():
    """k = 2, one group kept, groups of 2 scored by their top-2 sum: equal sums keep the lower group index."""
    cfg = moe("moe.num_experts=8", "moe.top_k=2", "moe.num_groups=4", "moe.topk_groups=1", "moe.score_fn=sigmoid")
    choice = torch.tensor([[0.5, 0.5, 0.6, 0.4, 0.3, 0.3, 0.2, 0.1]])  # sums 1.0, 1.0, 0.6, 0.3
    assert torch.isfinite(group_limited(choice, cfg, 2)[0]).tolist() == [True, True] + [False] * 6
    logits = torch.tensor([[0.4, -0.2, -0.2, 0.4, -1.0, -1.0, -2.0, -2.0]])  # groups 0 and 1: equal sums, exactly
    assert token_choice(logits, cfg, 2, 0.0).requested_TK[0].tolist() == [0, 1]
    bias = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0, 0.0])  # group 1 now sums higher: the bias picks groups too
    a = token_choice(logits, cfg, 2, 0.0, bias)
    assert a.requested_TK[0].tolist() == [3, 2]
    torch.testing.assert_close(a.weight_A, torch.tensor([0.4, -0.2]).sigmoid())  # unbiased sigmoids, raw


def test_one_group_or_all_groups_change_nothing():
    torch.manual_seed(1)
    choice = torch.rand(16, 8)
    for overrides in (["moe.num_groups=1"], ["moe.num_groups=4", "moe.topk_groups=4"], ["moe.num_groups=4"]):
        assert torch.equal(group_limited(choice, moe("moe.num_experts=8", *overrides), 2), choice)


def test_group_score_uses_at_least_one_expert():
    """k = 2 with 4 groups kept: n = max(1, 2 // 4) = 1, the group's best score (DeepSeek-V2's device-limited rule)."""
    cfg = moe("moe.num_experts=8", "moe.top_k=2", "moe.num_groups=8", "moe.topk_groups=4")
    choice = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]])
    assert torch.isfinite(group_limited(choice, cfg, 2)[0]).nonzero().flatten().tolist() == [1, 3, 5, 7]


def test_bias_step_oracle():
    bias = torch.zeros(4)
    bias_step(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), 0.01)  # mean 5: overloaded expert 0 goes down
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    bias_step(bias, torch.tensor([3.0, 3.0, 3.0, 3.0]), 0.01)  # balanced: sign(0) = 0
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    bias_step(bias, torch.tensor([0.0, 7.0, 0.0, 1.0]), 0.5)  # mean 2
    torch.testing.assert_close(bias, torch.tensor([0.49, -0.49, 0.51, 0.51]))


def test_bias_is_state_not_a_parameter():
    cfg = load_config(None, ["moe.routing=topk", "model.d_model=32", "moe.balance=aux_free"])
    block = MoEFFN(cfg.model, cfg.moe, LayerFactory(), index=3)
    assert "expert_bias" in block.state_dict() and all("bias" not in n for n, _ in block.named_parameters())
    assert list(expert_biases(torch.nn.ModuleDict({"b": block}))) == ["b.expert_bias"]
    plain = MoEFFN(cfg.model, moe("moe.balance=aux_loss"), LayerFactory())
    assert "expert_bias" not in plain.state_dict()


@pytest.mark.parametrize(
    ("balance", "level", "losses"),
    [("aux_loss", "auto", {"balance", "z"}), ("aux_free", "auto", {"z"}), ("aux_free", "sequence", {"balance", "z"}),
     ("none", "micro_batch", {"z"})],
)  # fmt: skip
def test_which_balance_loss(balance, level, losses):
    """aux_free adds the balance loss only at an explicit level (V3's complementary sequence loss); none never."""
    cfg = load_config(None, ["moe.routing=topk", "model.d_model=32", f"moe.balance={balance}",
                             f"moe.balance_loss_level={level}"])  # fmt: skip
    block = MoEFFN(cfg.model, cfg.moe, LayerFactory()).train()
    _, out = block(torch.randn(8, 2, 32))
    assert set(out.losses) == losses


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["moe.routing=expert_choice", "moe.capacity_factor=2", "moe.balance=aux_free"], "moe.balance"),
        (["moe.routing=lory", "moe.balance=aux_free"], "moe.balance"),
        (["moe.routing=sparsemixer", "moe.balance=aux_free"], "moe.balance"),
        (["moe.routing=topk", "moe.num_experts=8", "moe.num_groups=3"], "moe.num_groups"),
        (["moe.routing=topk", "moe.num_experts=8", "moe.num_groups=4", "moe.topk_groups=5"], "moe.topk_groups"),
        (["moe.routing=topk", "moe.num_experts=8", "moe.top_k=4", "moe.num_groups=4", "moe.topk_groups=1"],
         "moe.topk_groups"),
        (["moe.routing=sparsemixer", "moe.routed_scaling=2"], "moe.routed_scaling"),
        (["moe.routing=expert_choice", "moe.capacity_factor=2", "moe.num_groups=2"], "moe.num_groups"),
        (["moe.routing=topk", "moe.bias_update_rate=-1"], "moe.bias_update_rate"),
    ],
)  # fmt: skip
def test_config_refusals_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("scorer", ["linear", "gru"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_bias_composes_with_scorers_and_capacity(scorer, capacity_factor):
    """A large bias on expert 3 makes every token request it (GRU or linear scorer, capacity or dropless);
    its combine weight stays the unbiased score; capacity then drops the overflow."""
    from megamoe.model.init import init_parameters
    from megamoe.model.moe.gru import GRUCell
    from megamoe.model.moe.state import RoutingState

    cfg = load_config(None, ["moe.routing=topk", "model.d_model=32", "moe.num_experts=4", "moe.balance=aux_free",
                             f"moe.scorer={scorer}", "moe.gru_hidden=8", f"moe.capacity_factor={capacity_factor}",
                             "moe.min_capacity=1"])  # fmt: skip
    block, gru = MoEFFN(cfg.model, cfg.moe, LayerFactory()).train(), GRUCell(8)
    for module in (block, gru):
        init_parameters(module, cfg.model, seed=0)
    block.record_routing = True
    block.expert_bias[3] = 10.0
    state = RoutingState(gru=gru) if scorer == "gru" else None
    _, out = block(torch.randn(8, 2, 32), state)
    assert (out.record["choice_LBK"] == 3).any(-1).all()
    kept = out.record["kept_LBK"] & (out.record["choice_LBK"] == 3)
    probs = out.record["probs_LBE"][..., 3]
    torch.testing.assert_close(out.record["weight_LBE"][..., 3][kept.any(-1)], probs[kept.any(-1)])
    assert int(kept.sum()) == (16 if capacity_factor == 0 else 8)  # C = ceil(2·1·16/4) = 8
