"""RMoE oracles (algorithms.md §3.6): the GRU, state passing, the recurrent gradient, parameter count."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import ModelConfig, load_config
from megamoe.model import LayerFactory, build_model
from megamoe.model.init import init_parameters
from megamoe.model.moe import MoEFFN
from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.state import RoutingState
from megamoe.model.params import count_parameters

MODEL = ModelConfig(d_model=32, num_layers=4, num_heads=4, seq_len=16, vocab_size=64, ffn_hidden_size=48)


def moe(*overrides: str):
    """An RMoE section (GRU scorer, token choice)."""
    return load_config(
        None, ["moe.routing=topk", "moe.scorer=gru", "moe.num_experts=4", "moe.gru_hidden=8", *overrides]
    ).moe


def test_gru_equals_torch_grucell():
    torch.manual_seed(0)
    ours, ref = GRUCell(8), torch.nn.GRUCell(8, 8)
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(ours(x, h), ref(x, h))


def two_blocks(*overrides: str):
    """Two RMoE blocks sharing one GRU, seeded."""
    cfg = moe(*overrides)
    blocks = [MoEFFN(MODEL, cfg, LayerFactory(), index) for index in (0, 1)]
    gru = GRUCell(cfg.gru_hidden)
    for i, module in enumerate([*blocks, gru]):
        init_parameters(module, MODEL, seed=i)
    with torch.no_grad():
        gru.bias_ih.normal_()
    return blocks, gru


def logits_after(blocks, gru, x_TD: torch.Tensor, state: RoutingState | None = None) -> torch.Tensor:
    """Router logits of the second block after the first one ran (on the same tokens)."""
    state = state or RoutingState(gru=gru)
    blocks[0].logits(x_TD, state, None)
    return blocks[1].logits(x_TD, state, None)


def test_state_is_carried_and_no_passing_is_a_zero_state():
    blocks, gru = two_blocks()
    x = torch.randn(6, 32)
    carried = logits_after(blocks, gru, x)
    fresh = blocks[1].logits(x, RoutingState(gru=gru), None)  # zero state
    assert not torch.allclose(carried, fresh), "the state from layer 1 changes layer 2's routing"
    np_blocks, np_gru = two_blocks("moe.gru_no_passing=true")
    torch.testing.assert_close(
        logits_after(np_blocks, np_gru, x), np_blocks[1].logits(x, RoutingState(gru=np_gru), None)
    )


@pytest.mark.parametrize("detach", [False, True])
def test_recurrent_gradient_reaches_the_first_projector(detach):
    """A loss on the last MoE layer's router logits trains the first layer's projector (not when detached)."""
    blocks, gru = two_blocks(f"moe.gru_detach_state={str(detach).lower()}")
    logits_after(blocks, gru, torch.randn(6, 32)).pow(2).sum().backward()
    grad = blocks[0].scorer.proj.weight.grad
    if detach:
        assert grad is None or torch.count_nonzero(grad) == 0
    else:
        assert grad is not None and grad.abs().sum() > 0
        assert gru.weight_ih.grad.abs().sum() > 0


def test_parameter_count_formula():
    """Extra router parameters: n_moe·(d·p + p·E) + 6p² + 6p instead of n_moe·d·E (§3.1)."""
    model = ModelConfig(d_model=32, num_layers=4, num_heads=4, seq_len=16, vocab_size=64)
    rmoe = load_config(
        None,
        [
            "moe.routing=topk",
            "moe.scorer=gru",
            "moe.num_experts=4",
            "moe.gru_hidden=8",
            "moe.moe_every=2",
            "model.num_layers=4",
        ],
    ).moe
    linear = load_config(None, ["moe.routing=topk", "moe.num_experts=4", "moe.moe_every=2", "model.num_layers=4"]).moe
    n, d, p, e = 2, 32, 8, 4
    extra = (
        count_parameters(build_model(model, 0, moe=rmoe)).total
        - count_parameters(build_model(model, 0, moe=linear)).total
    )
    assert extra == n * (d * p + p * e) + 6 * p * p + 6 * p - n * d * e


def test_gru_is_shared_and_state_unchanged_across_dense_layers():
    cfg = load_config(
        None, ["moe.routing=topk", "moe.scorer=gru", "moe.num_experts=4", "moe.moe_every=2", "model.num_layers=4"]
    )
    model = build_model(MODEL, 0, moe=cfg.moe)
    assert sum(1 for n, _ in model.named_parameters() if "weight_ih" in n) == 1
    assert [type(layer.ffn).__name__ for layer in model.layers] == ["SwiGLU", "MoEFFN", "SwiGLU", "MoEFFN"]


def test_rmoe_model_is_causal():
    model = build_model(MODEL, 0, moe=moe()).train()
    tokens = torch.randint(0, 64, (2, 16))
    changed = tokens.clone()
    changed[:, 11] = (changed[:, 11] + 3) % 64
    torch.testing.assert_close(model(tokens).logits_BLV[:, :11], model(changed).logits_BLV[:, :11], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "routing", [["moe.routing=sparsemixer"], ["moe.routing=expert_choice", "moe.capacity_factor=2"]]
)
def test_gru_composes_with_other_routings(routing):
    cfg = load_config(None, [*routing, "moe.scorer=gru", "moe.num_experts=4"]).moe
    model = build_model(MODEL, 0, moe=cfg)
    out = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    (out.loss + out.aux_loss).backward()
    assert model.router_gru.weight_hh.grad.abs().sum() > 0


def test_init_zeroes_the_gru_biases_and_only_norm_scales_start_at_one():
    """Biases start at 0 (Megatron's init), the GRU's `bias_ih`/`bias_hh` included; 1 is for norm scales only.

    GRU biases of 1 (the rule once matched only names ending in `bias`) start the update gate at σ(2) = 0.88
    and push every token's state toward the same bias-driven value, so the router sees nearly constant input.
    """
    cfg = load_config(
        None,
        [
            "model.vocab_size=64",
            "model.d_model=32",
            "model.qkv_bias=true",
            "moe.routing=topk",
            "moe.scorer=gru",
            "moe.num_experts=4",
        ],
    )
    model = build_model(cfg.model, 0, moe=cfg.moe)
    ones = {n for n, p in model.named_parameters() if p.ndim == 1 and bool((p == 1).all())}
    zeros = {n for n, p in model.named_parameters() if p.ndim == 1 and not p.any()}
    assert {"router_gru.bias_ih", "router_gru.bias_hh", "layers.0.attn.qkv.bias"} <= zeros
    assert ones and all(n.endswith("norm.weight") for n in ones), ones
    gru = model.router_gru
    zero_TP = torch.zeros(3, gru.weight_ih.shape[1])
    torch.testing.assert_close(gru(zero_TP, zero_TP), zero_TP, rtol=0, atol=0)
