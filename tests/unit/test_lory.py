"""Lory oracles (algorithms.md §1.11): merging, causality, the stop-gradient, isolation, dense equivalences."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megamoe.config import ModelConfig, load_config
from megamoe.model import LayerFactory, build_model
from megamoe.model.init import init_parameters
from megamoe.model.layers import SwiGLU
from megamoe.model.moe import MoELayerOutput
from megamoe.model.moe.lory import LoryFFN
from megamoe.model.params import count_parameters, flops_per_token
from megamoe.ops.lory import TRANSPOSE_MIN_SEGMENTS_PER_EXPERT, forward_transposed, merged_swiglu_reference
from megamoe.ops.reference import merged_swiglu_loop
from megamoe.train.moe_metrics import MoEMetrics

MODEL = ModelConfig(d_model=16, num_layers=2, num_heads=2, seq_len=24, vocab_size=50, ffn_hidden_size=20)
SEG = 4


@pytest.fixture(autouse=True)
def float64():
    """Every test here runs in float64 (exact comparisons); the default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def moe(*overrides: str):
    """A Lory section with 4-token segments."""
    return load_config(None, ["moe.routing=lory", "moe.num_experts=4", f"moe.segment_length={SEG}", *overrides]).moe


def lory_layer(*overrides: str, seed: int = 0) -> LoryFFN:
    """One seeded Lory layer in float64."""
    layer = LoryFFN(MODEL, moe(*overrides), LayerFactory())
    init_parameters(layer, MODEL, seed)
    return layer.double()


def lory_model(*overrides: str, seed: int = 0):
    """A two-layer Lory transformer (every FFN a Lory layer), float64."""
    return build_model(MODEL, seed, moe=moe("moe.moe_every=1", *overrides)).double()


def dense_like(layer: LoryFFN, expert: int = 0) -> SwiGLU:
    """A dense SwiGLU holding one expert's weights."""
    dense = SwiGLU(MODEL.d_model, MODEL.ffn_hidden, LayerFactory()).double()
    e = layer.experts
    with torch.no_grad():
        dense.gate.weight.copy_(e.w_gate[expert])
        dense.up.weight.copy_(e.w_up[expert])
        dense.down.weight.copy_(e.w_down[expert])
    return dense


def test_one_expert_is_the_dense_ffn():
    """E = 1: every weight is 1, the layer is the dense SwiGLU (outputs and input gradients)."""
    layer = lory_layer("moe.num_experts=1")
    dense = dense_like(layer)
    x = torch.randn(10, 3, MODEL.d_model, requires_grad=True)
    y, _ = layer(x)
    torch.testing.assert_close(y, dense(x))
    (g_lory,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_()
    (g_dense,) = torch.autograd.grad(dense(x2).square().sum(), x2)
    torch.testing.assert_close(g_lory, g_dense)


def test_identical_experts_are_the_dense_ffn_for_any_router():
    """Right after upcycling (all experts one FFN) the output is the dense FFN's, whatever the router says."""
    layer = lory_layer()
    with torch.no_grad():
        for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
            w.copy_(w[:1].expand_as(w))
        layer.scorer.router.weight.normal_(std=0.5)
    x = torch.randn(13, 2, MODEL.d_model)
    y, out = layer(x)
    assert out.segment_weights.max() < 0.99, "the router is far from one-hot"
    torch.testing.assert_close(y, dense_like(layer)(x))


def test_merge_is_in_parameter_space_not_output_space():
    """e = (½, ½): FFN(x; (θ1+θ2)/2), which differs from ½FFN(x; θ1) + ½FFN(x; θ2)."""
    layer = lory_layer("moe.num_experts=2")
    with torch.no_grad():
        for w in layer.experts.parameters():
            w.normal_(std=0.5)
    x_STD = torch.randn(3, SEG, MODEL.d_model)
    w_SE = torch.full((3, 2), 0.5)
    y = layer.merged(x_STD, w_SE)
    mean_ffn = dense_like(layer)
    e = layer.experts
    with torch.no_grad():
        for dense_w, w in (
            (mean_ffn.gate.weight, e.w_gate),
            (mean_ffn.up.weight, e.w_up),
            (mean_ffn.down.weight, e.w_down),
        ):
            dense_w.copy_(w.mean(0))
    torch.testing.assert_close(y, mean_ffn(x_STD))
    mixed = 0.5 * dense_like(layer, 0)(x_STD) + 0.5 * dense_like(layer, 1)(x_STD)
    assert (y - mixed).abs().max() > 0.1 * y.abs().max()


def merge_args(segments: int = 5):
    """Random float64 inputs of the merged SwiGLU (3 experts, F 8, D 6, T 7), requiring grad."""
    torch.manual_seed(0)
    args = [
        torch.randn(segments, 7, 6),
        torch.randn(segments, 3).softmax(-1),
        torch.randn(3, 8, 6),
        torch.randn(3, 8, 6),
        torch.randn(3, 6, 8),
    ]
    return [a.requires_grad_() for a in args]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
def test_reference_merge_equals_the_loop(chunk, transpose):
    """The chunked merge + bmm path (merge recomputed in backward) equals the per-segment loop, outputs and grads,
    with the forward's experts in either layout."""
    args = merge_args()
    fast, slow = merged_swiglu_reference(*args, chunk_segments=chunk, transpose=transpose), merged_swiglu_loop(*args)
    torch.testing.assert_close(fast, slow)
    cot = torch.randn_like(fast)
    for g_fast, g_slow in zip(torch.autograd.grad(fast, args, cot), torch.autograd.grad(slow, args, cot)):
        torch.testing.assert_close(g_fast, g_slow)


@pytest.mark.parametrize("transpose", [False, True])
def test_reference_merge_gradcheck(transpose):
    merged = functools.partial(merged_swiglu_reference, chunk_segments=2, transpose=transpose)
    assert torch.autograd.gradcheck(merged, merge_args(3))


def test_forward_layout_follows_segments_per_expert():
    """The default layout: experts transposed from TRANSPOSE_MIN_SEGMENTS_PER_EXPERT segments per expert on."""
    least = TRANSPOSE_MIN_SEGMENTS_PER_EXPERT
    assert [forward_transposed(s, 8) for s in (8 * least - 1, 8 * least)] == [False, True]
    assert forward_transposed(128, 8) and not forward_transposed(32, 8)  # the bench's T = 64 and T = 256


@pytest.mark.parametrize("transpose", [False, True])
def test_reference_merge_under_bf16_autocast(transpose):
    """Matmuls in bf16 (the output too), merge and weight gradients accumulated in fp32, close to fp32."""
    args = [a.detach().float().requires_grad_() for a in merge_args()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = merged_swiglu_reference(*args, transpose=transpose)
    assert low.dtype == torch.bfloat16
    grads = torch.autograd.grad(low.float().sum(), args)
    assert [g.dtype for g in grads] == [torch.float32] * 5
    full = merged_swiglu_reference(*args)
    torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.05 * full.abs().max().item())
    for g_low, g_full in zip(grads, torch.autograd.grad(full.sum(), args)):
        torch.testing.assert_close(g_low, g_full, rtol=0.05, atol=0.05 * g_full.abs().max().item())


def test_every_expert_gets_a_gradient():
    """Dense gradients: every expert with non-zero weight gets a non-zero gradient in all three matrices."""
    layer = lory_layer()
    y, _ = layer(torch.randn(12, 2, MODEL.d_model))
    y.square().sum().backward()
    for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
        assert (w.grad.flatten(1).abs().sum(1) > 0).all()
    assert layer.scorer.router.weight.grad.abs().sum() > 0


def test_segment_k_is_routed_by_segment_k_minus_1():
    """weights[k] = softmax(R(mean of segment k−1)); weights[0] from segment 0 itself; ragged last segment."""
    layer = lory_layer()
    x = torch.randn(14, 2, MODEL.d_model)  # segments of 4, 4, 4, 2 tokens
    _, out = layer(x)
    means = torch.stack([x[s : s + SEG].mean(0) for s in range(0, 14, SEG)])
    probs = layer.scorer.router(means).softmax(-1)
    torch.testing.assert_close(out.segment_weights, torch.cat([probs[:1], probs[:-1]]))
    x2 = x.clone()
    x2[2 * SEG : 3 * SEG] += torch.randn(SEG, 2, MODEL.d_model)  # segment 2's own tokens
    _, out2 = layer(x2)
    torch.testing.assert_close(out2.segment_weights[:3], out.segment_weights[:3])
    assert not torch.allclose(out2.segment_weights[3], out.segment_weights[3])


def test_prefix_mode_routes_every_segment_by_the_first():
    layer = lory_layer("moe.routing_mode=prefix")
    _, out = layer(torch.randn(12, 2, MODEL.d_model))
    torch.testing.assert_close(out.segment_weights, out.segment_weights[:1].expand(3, -1, -1))


def test_model_is_causal_after_the_first_segment():
    """Changing any token after t leaves every logit up to t unchanged, for all t ≥ T (two Lory layers)."""
    model = lory_model()
    tokens = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len))
    base = model(tokens).logits_BLV
    for t in range(SEG, MODEL.seq_len - 1):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, MODEL.vocab_size, changed[:, t + 1 :].shape)
        after = model(changed).logits_BLV
        torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)


def test_first_segment_sees_its_own_future_forward_only():
    """The documented leak: segment 0's weights use its own mean, so an early token's output can change
    when a later token of segment 0 changes; the stop-gradient keeps the router from learning it."""
    model = lory_model()
    tokens = torch.randint(0, MODEL.vocab_size, (1, MODEL.seq_len))
    changed = tokens.clone()
    changed[0, SEG - 1] = (tokens[0, SEG - 1] + 1) % MODEL.vocab_size
    assert (model(changed).logits_BLV[0, 0] - model(tokens).logits_BLV[0, 0]).abs().max() > 0
    out = model(tokens, tokens)
    out.token_loss_BL[:, :SEG].sum().backward()
    for layer in model.layers:
        assert torch.count_nonzero(layer.ffn.scorer.router.weight.grad) == 0
    assert model.layers[0].ffn.experts.w_gate.grad.abs().sum() > 0


def test_no_leak_across_sequences():
    model = lory_model()
    tokens = torch.randint(0, MODEL.vocab_size, (3, MODEL.seq_len))
    changed = tokens.clone()
    changed[1] = torch.randint(0, MODEL.vocab_size, (MODEL.seq_len,))
    base, after = model(tokens).logits_BLV, model(changed).logits_BLV
    torch.testing.assert_close(after[[0, 2]], base[[0, 2]], rtol=0, atol=0)


def test_dense_phase_routes_everything_to_expert_0():
    """Warm-up: one-hot weights on expert 0, output = expert 0 as a dense FFN, no router gradient."""
    layer = lory_layer()
    layer.dense_phase = True
    x = torch.randn(12, 2, MODEL.d_model)
    y, out = layer(x)
    torch.testing.assert_close(y, dense_like(layer)(x))
    assert (out.segment_weights[..., 0] == 1).all()
    y.square().sum().backward()
    assert torch.count_nonzero(layer.scorer.router.weight.grad) == 0
    assert torch.count_nonzero(layer.experts.w_gate.grad[1:]) == 0


def test_gru_scorer_routes_segments():
    """RMoE's GRU scorer works as Lory's router (the GRU carries state across layers per segment)."""
    model = lory_model("moe.scorer=gru", "moe.gru_hidden=8")
    tokens = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len))
    out = model(tokens, tokens)
    out.loss.backward()
    assert model.router_gru.weight_ih.grad.abs().sum() > 0
    assert out.moe[1].segment_weights.shape == (MODEL.seq_len // SEG, 2, 4)


def _flops(fn, *args) -> int:
    """FLOPs of one forward call, counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def test_merge_flops_over_ffn_flops_is_e_over_t():
    """Counted by torch's FLOP counter on the reference path, and in the trainer's FLOPs formula."""
    e, t, s, d, f = 6, 16, 3, 8, 12
    args = (torch.randn(s, t, d), torch.randn(s, e).softmax(-1), *(torch.randn(e, f, d),) * 2, torch.randn(e, d, f))
    merge_and_ffn = _flops(merged_swiglu_reference, *args)
    dense = SwiGLU(d, f, LayerFactory())
    ffn = _flops(dense, args[0])
    assert ffn == 3 * 2 * s * t * d * f
    assert (merge_and_ffn - ffn) / ffn == pytest.approx(e / t)

    def train_flops(num_experts: int, seg: int) -> float:
        cfg = moe(f"moe.num_experts={num_experts}", f"moe.segment_length={seg}", "moe.moe_every=1")
        return flops_per_token(MODEL, count_parameters(build_model(MODEL, 0, moe=cfg)), cfg)

    ffn = 6 * 3 * MODEL.d_model * MODEL.ffn_hidden * MODEL.num_layers
    assert (train_flops(8, 8) - train_flops(8, MODEL.seq_len * 10)) / ffn == pytest.approx(8 / 8 - 8 / MODEL.seq_len)


def test_active_parameters_count_one_merged_ffn():
    cfg = moe("moe.moe_every=1")
    counts = count_parameters(build_model(MODEL, 0, moe=cfg))
    dense = count_parameters(build_model(MODEL, 0))
    router = MODEL.num_layers * MODEL.d_model * 4
    assert counts.active == dense.active + router
    assert counts.total == dense.total + router + 3 * 3 * MODEL.d_model * MODEL.ffn_hidden * MODEL.num_layers


def test_utilization_counts_weights_above_two_over_e():
    """An expert is used in a segment when its weight > 2/E (Lory App. G.1); load is tokens × weight."""
    layer = lory_layer()
    w_NbE = torch.full((3, 2, 4), 0.25)
    w_NbE[1, 0] = torch.tensor([0.0, 0.0, 0.9, 0.1])
    stats = layer._stats(w_NbE, torch.tensor([4, 4, 2]))
    assert stats.active_E.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(stats.load_E.sum(), torch.tensor(20.0, dtype=torch.float64))
    metrics = MoEMetrics(layer.cfg)
    metrics.add({0: MoELayerOutput({}, stats)})
    assert metrics.reduce()["moe/L0/utilization"] == 0.25
