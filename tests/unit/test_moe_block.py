"""MoE block: grouped experts vs their loop reference, dispatch, dense equivalences, causality, layout, counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig, load_config
from megamoe.errors import ConfigError
from megamoe.model import build_model
from megamoe.model.moe import GroupedExperts, LocalDispatcher, MoEFFN
from megamoe.model.moe.routing import route
from megamoe.model.params import count_parameters
from megamoe.ops import grouped_linear
from megamoe.ops.grouped import padded_grouped_linear
from megamoe.ops.reference import grouped_linear_loop

MODEL = ModelConfig(d_model=32, num_layers=2, num_heads=4, seq_len=16, vocab_size=64, ffn_hidden_size=48)


def moe_cfg(*overrides: str):
    """The MoE section with overrides."""
    return load_config(None, ["moe.routing=topk", "moe.num_experts=4", *overrides]).moe


@pytest.mark.parametrize("impl", [grouped_linear, padded_grouped_linear])
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 9, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_linear_matches_loop(impl, counts, dtype, tol):
    """Output and both gradients equal the per-expert loop (zero-token experts, empty input, bf16)."""
    torch.manual_seed(0)
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 24, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 40, 24, dtype=dtype, requires_grad=True)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grad = torch.randn(len(x), 40, dtype=dtype)
    y, yr = impl(x, w, counts_E), grouped_linear_loop(xr, wr, counts_E)
    (y * grad).sum().backward()
    (yr * grad).sum().backward()
    assert w.grad is not None, "a rank with no tokens still gets (zero) weight gradients"
    assert x.grad is not None, "empty input stays in the graph (its backward collectives must run)"
    want_dw = wr.grad if wr.grad is not None else torch.zeros_like(w)
    for got, want, name in ((y, yr, "y"), (x.grad, xr.grad, "dx"), (w.grad, want_dw, "dw")):
        scale = 1 + float(want.detach().float().abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(
            got.float(), want.float(), rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_padding_to_capacity_changes_nothing():
    torch.manual_seed(1)
    counts_E = torch.tensor([3, 1, 0, 2])
    x, w = torch.randn(6, 8), torch.randn(4, 5, 8)
    torch.testing.assert_close(
        padded_grouped_linear(x, w, counts_E, rows_per_expert=7), grouped_linear_loop(x, w, counts_E)
    )


def naive_moe(x_TD: torch.Tensor, assign, experts: GroupedExperts) -> torch.Tensor:
    """Σ over each token's assignments of weight · SwiGLU_expert(x), one token at a time."""
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(assign.token_A.tolist(), assign.expert_A.tolist(), assign.weight_A):
        x = x_TD[t]
        h = F.silu(experts.w_gate[e] @ x) * (experts.w_up[e] @ x)
        out[t] += w * (experts.w_down[e] @ h)
    return out


@pytest.mark.parametrize(
    "overrides",
    [[], ["moe.capacity_factor=0.5", "moe.min_capacity=1"], ["moe.routing=expert_choice", "moe.capacity_factor=1.5"]],
)
def test_dispatch_matches_per_token_loop(overrides):
    torch.manual_seed(2)
    cfg = moe_cfg(*overrides)
    experts = GroupedExperts(4, 32, 48)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(40, 32)
    assign = route(torch.randn(40, 4), cfg, training=True)
    torch.testing.assert_close(
        LocalDispatcher(4)(x, assign, experts, None), naive_moe(x, assign, experts), rtol=1e-4, atol=1e-5
    )


def block(*overrides: str, model: ModelConfig = MODEL) -> MoEFFN:
    """A MoE block with seeded weights."""
    torch.manual_seed(3)
    layer = MoEFFN(model, moe_cfg(*overrides), build_model(model, 0).factory)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return layer


def dense_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Reference SwiGLU."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def test_identical_experts_with_normalized_weights_equal_the_dense_ffn():
    layer = block("moe.renormalize=true", "moe.top_k=2")
    with torch.no_grad():
        for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
            w.copy_(w[0].expand_as(w))
    x = torch.randn(16, 3, 32)
    y, _ = layer(x)
    e = layer.experts
    torch.testing.assert_close(y, dense_swiglu(x, e.w_gate[0], e.w_up[0], e.w_down[0]), rtol=1e-5, atol=1e-6)


def test_residual_moe_without_drops_is_dense_plus_weighted_experts():
    """OpenMoE §5.5: with capacity → ∞, output = dense FFN + Σ_topk p_i · Expert_i."""
    layer = block("moe.residual=true", "moe.capacity_factor=100")
    x = torch.randn(16, 2, 32)
    y, out = layer(x)
    x_TD = x.reshape(-1, 32)
    probs = F.linear(x_TD, layer.scorer.router.weight).softmax(-1)
    top_p, top_e = probs.topk(2, dim=-1)
    e = layer.experts
    expected = dense_swiglu(x_TD, layer.dense.gate.weight, layer.dense.up.weight, layer.dense.down.weight)
    for t in range(len(x_TD)):
        for p, i in zip(top_p[t], top_e[t]):
            expected[t] = expected[t] + p * dense_swiglu(x_TD[t], e.w_gate[i], e.w_up[i], e.w_down[i])
    torch.testing.assert_close(y.reshape(-1, 32), expected, rtol=1e-4, atol=1e-5)
    assert out.stats.load_E.sum() == out.stats.requested_E.sum() == 2 * len(x_TD)


def test_shared_experts_are_added():
    layer = block("moe.num_shared_experts=2")
    assert layer.shared.gate.weight.shape == (96, 32)
    x = torch.randn(16, 2, 32)
    y, _ = layer(x)
    without = layer.shared
    layer.shared = None
    y_routed, _ = layer(x)
    torch.testing.assert_close(y - y_routed, without(x))


def moe_model(*overrides: str, model: ModelConfig = MODEL):
    """A full MoE transformer."""
    cfg = load_config(None, ["moe.routing=topk", "moe.num_experts=4", *overrides])
    return build_model(model, 0, moe=cfg.moe)


# Causality tolerance: a changed token can change an expert's row count, and a grouped GEMM of a
# different shape may sum in a different order (ULP-level differences, ~1e-8), never more.
CAUSAL_ATOL = 1e-6


def test_dropless_token_choice_model_is_causal():
    model = moe_model().train()
    tokens = torch.randint(0, 64, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    torch.testing.assert_close(
        model(tokens).logits_BLV[:, :9], model(changed).logits_BLV[:, :9], rtol=0, atol=CAUSAL_ATOL
    )


def test_expert_choice_leaks_in_training_not_in_eval():
    """EC picks tokens by comparing the whole group: a later token changes earlier outputs in training mode."""
    model = moe_model("moe.routing=expert_choice", "moe.capacity_factor=1.0")
    tokens = torch.randint(0, 64, (2, 16))
    leaks = []
    for seed in range(10):
        changed = tokens.clone()
        changed[:, 15] = torch.randint(0, 64, (2,), generator=torch.Generator().manual_seed(seed))
        model.train()
        change = (model(tokens).logits_BLV[:, :15] - model(changed).logits_BLV[:, :15]).abs().max()
        leaks.append(change > 1e-4)
        model.eval()
        torch.testing.assert_close(
            model(tokens).logits_BLV[:, :15], model(changed).logits_BLV[:, :15], rtol=0, atol=CAUSAL_ATOL
        )
    assert any(leaks), "expert choice in training mode must show the future-token leak"


def test_sparse_layer_placement():
    model = ModelConfig(d_model=16, num_layers=24, num_heads=2, seq_len=8, vocab_size=32)
    moe = load_config(None, ["moe.routing=topk", "moe.moe_every=6", "model.num_layers=24"]).moe
    layers = build_model(model, 0, moe=moe).layers
    assert [i for i, layer in enumerate(layers) if isinstance(layer.ffn, MoEFFN)] == [5, 11, 17, 23]


def test_active_parameter_counts():
    counts = count_parameters(moe_model("moe.top_k=2"))
    dense = count_parameters(build_model(MODEL, 0))
    expert = 3 * 32 * 48
    router = 32 * 4
    assert counts.total == dense.total + 2 * (3 * expert + router)  # 4 experts instead of 1 FFN, plus a router
    assert counts.active == dense.total + 2 * (expert + router)  # 2 of 4 experts per token
    ec = count_parameters(moe_model("moe.routing=expert_choice", "moe.capacity_factor=1.0"))
    assert ec.active == dense.total + 2 * router


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["moe.routing=expert_choice"], "moe.capacity_factor: expert_choice needs c > 0"),
        (
            ["moe.routing=topk", "moe.top_k=5", "moe.num_experts=4"],
            r"moe.top_k: \(5\) must be <= moe.num_experts \(4\)",
        ),
        (
            ["moe.routing=topk", "moe.top_k=1", "moe.renormalize=true"],
            "moe.renormalize: a renormalized top-1 softmax weight is always 1",
        ),
        (["moe.routing=topk", "moe.moe_every=9", "model.num_layers=4"], r"moe.moe_every: \(9\) leaves no MoE block"),
        (["moe.routing=topk", "moe.balance_loss_level=batch"], "moe.balance_loss_level: expected one of"),
    ],
)
def test_moe_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_pad_to_capacity_equals_unpadded():
    padded, plain = block("moe.capacity_factor=1.0", "moe.pad_to_capacity=true"), block("moe.capacity_factor=1.0")
    x = torch.randn(16, 2, 32)
    torch.testing.assert_close(padded(x)[0], plain(x)[0])


def test_eval_uses_eval_capacity_factor():
    layer = block("moe.capacity_factor=0.25", "moe.min_capacity=1", "moe.eval_capacity_factor=0")
    x = torch.randn(16, 2, 32)
    assert layer.train()(x)[1].stats.load_E.sum() < 64
    assert layer.eval()(x)[1].stats.load_E.sum() == 64
    assert dataclasses.fields(layer.cfg)
