"""Fused Lory merge kernels against the float64 loop reference: outputs and every gradient.

On a machine without a GPU these run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small shapes that are not block multiples; with CUDA they run on the GPU.
Error measure (device METHOD.md): ‖out − ref‖ / ‖ref‖ against a float64 reference on the same inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from megamoe.errors import ConfigError
from megamoe.ops.lory import merged_swiglu_reference, resolve_merge_impl
from megamoe.ops.lory_check import relative_bound, tolerance
from megamoe.ops.reference import merged_swiglu_loop

triton = pytest.importorskip("triton")
from megamoe_kernels.lory import merged_matmul, merged_weight_grad  # noqa: E402

from megamoe.ops.lory_triton import merged_swiglu_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

TOLERANCE = {dtype: tolerance(dtype, DEVICE) for dtype in (torch.float32, torch.bfloat16)}
"""Relative error bounds (shared with the self-check): IEEE fp32 in the interpreter, TF32 possible on a GPU, bf16."""

SHAPES = {
    "ragged": dict(segments=3, tokens=20, width=24, hidden=40, experts=3),
    "one_expert": dict(segments=2, tokens=16, width=16, hidden=16, experts=1),
    "padded_experts": dict(segments=2, tokens=9, width=18, hidden=33, experts=5),
    "many_experts": dict(segments=2, tokens=17, width=20, hidden=24, experts=12),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN never passes."""
    got, want = got.double().cpu(), want.double().cpu()
    err = ((got - want).norm() / want.norm()).item()
    return float("inf") if err != err else err


def inputs(seed: int, dtype: torch.dtype, segments: int, tokens: int, width: int, hidden: int, experts: int):
    """Fresh random inputs: x (S, T, D) in dtype, routing weights (softmax), expert weights in fp32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(segments, tokens, width, generator=gen)
    w = torch.randn(segments, experts, generator=gen).softmax(-1)
    gate = torch.randn(experts, hidden, width, generator=gen) / width**0.5
    up = torch.randn(experts, hidden, width, generator=gen) / width**0.5
    down = torch.randn(experts, width, hidden, generator=gen) / hidden**0.5
    args = [x.to(dtype), w.to(dtype), gate, up, down]
    return [a.to(DEVICE).requires_grad_() for a in args]


def loop_reference(args, cot):
    """Output and gradients of the per-segment loop in float64 on the CPU."""
    ref_args = [a.detach().double().cpu().requires_grad_() for a in args]
    out = merged_swiglu_loop(*ref_args)
    return out.detach(), torch.autograd.grad(out, ref_args, cot.double().cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fused_merge_matches_reference(shape, dtype):
    """Output and all five gradients within the dtype's bound, and no worse than the reference path's own error."""
    args = inputs(list(SHAPES).index(shape), dtype, **SHAPES[shape])
    cot = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(99)).to(DEVICE, dtype)
    want = loop_reference(args, cot)
    errors = {}
    for name, fn in (("fused", merged_swiglu_triton), ("reference", merged_swiglu_reference)):
        out = fn(*args)
        assert out.dtype == dtype and out.shape == args[0].shape
        grads = torch.autograd.grad(out, args, cot)
        assert [g.dtype for g in grads] == [a.dtype for a in args]
        errors[name] = [rel_err(got, ref) for got, ref in zip((out, *grads), (want[0], *want[1]), strict=True)]
    names = ["y", "dx", "d routing weights", "dw_gate", "dw_up", "dw_down"]
    for name, fused, ref in zip(names, errors["fused"], errors["reference"], strict=True):
        assert fused < TOLERANCE[dtype], f"{name}: {fused:.2e}"
        assert fused <= relative_bound(ref), f"{name}: fused {fused:.2e} vs reference {ref:.2e}"


def test_merged_matmul_writes_every_element_and_reads_transposed_weights():
    """Poisoned output fully overwritten; a transposed (strided) weight view gives the transposed product."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(3, 21, 19, generator=gen, device="cpu").to(DEVICE)
    mix = torch.randn(3, 4, generator=gen).softmax(-1).to(DEVICE)
    w = torch.randn(4, 19, 35, generator=gen).to(DEVICE)  # (E, K, N): read as (E, N, K) through strides
    out = torch.full((3, 21, 35), float("nan"), device=DEVICE)
    got = merged_matmul(a, mix, w.transpose(1, 2), out=out)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    want = torch.einsum("stk,se,ekn->stn", a.double(), mix.double(), w.double())
    assert rel_err(got, want) < TOLERANCE[torch.float32]


def test_weight_grad_kernel_against_einsum():
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(4, 13, 22, generator=gen).to(DEVICE)
    b = torch.randn(4, 13, 30, generator=gen).to(DEVICE)
    mix = torch.randn(4, 6, generator=gen).softmax(-1).to(DEVICE)
    w = torch.randn(6, 22, 30, generator=gen).to(DEVICE)
    dw, dmix = merged_weight_grad(a, b, mix, w)
    p_SMN = torch.einsum("stm,stn->smn", a.double(), b.double())
    assert rel_err(dw, torch.einsum("se,smn->emn", mix.double(), p_SMN)) < TOLERANCE[torch.float32]
    assert rel_err(dmix, torch.einsum("emn,smn->se", w.double(), p_SMN)) < TOLERANCE[torch.float32]


def test_fused_equals_reference_under_bf16_autocast():
    """Same dtype policy as the reference: matmuls in the autocast dtype, gradients in the parameters' dtype."""
    args = inputs(5, torch.float32, **SHAPES["ragged"])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused = merged_swiglu_triton(*args)
        ref = merged_swiglu_reference(*args)
    assert fused.dtype == ref.dtype == torch.bfloat16
    assert rel_err(fused, ref) < 2e-2
    fused_grads = torch.autograd.grad(fused.float().sum(), args)
    ref_grads = torch.autograd.grad(ref.float().sum(), args)
    for got, want in zip(fused_grads, ref_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        assert rel_err(got, want) < 3e-2


def test_lory_layer_with_ragged_sequence_uses_the_kernels(caplog):
    """A whole Lory layer (ragged last segment: 22 tokens, T = 8) with merge_impl=triton equals the reference."""
    from megamoe.config import ModelConfig, load_config
    from megamoe.model import LayerFactory
    from megamoe.model.init import init_parameters
    from megamoe.model.moe.lory import LoryFFN

    model = ModelConfig(d_model=16, num_layers=1, num_heads=2, seq_len=22, vocab_size=50, ffn_hidden_size=24)
    outs, grads = [], []
    for impl in ("reference", "triton"):
        moe = load_config(None, ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8"]).moe
        moe.merge_impl = impl
        layer = LoryFFN(model, moe, LayerFactory()).to(DEVICE)
        init_parameters(layer, model, seed=3)
        x = torch.randn(22, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
        with caplog.at_level("INFO", logger="megamoe.ops.lory"):
            y, _ = layer(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    assert "moe.merge_impl=triton on" in caplog.text
    assert rel_err(outs[1], outs[0]) < TOLERANCE[torch.float32]
    for got, want in zip(grads[1], grads[0], strict=True):
        assert rel_err(got, want) < 1e-4


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU interpreter case")
def test_merge_impl_resolution(monkeypatch):
    """auto on the CPU is the fused CPU kernel where it builds (never Triton); triton runs in the interpreter."""
    from megamoe.ops import lory_cpu

    assert resolve_merge_impl("auto", torch.device("cpu")) == ("cpu" if lory_cpu.unavailable() is None else "reference")
    assert resolve_merge_impl("reference", torch.device("cpu")) == "reference"
    assert resolve_merge_impl("triton", torch.device("cpu")) == "triton"  # the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match=r"moe.merge_impl: triton needs a CUDA device; use reference or auto"):
        resolve_merge_impl("triton", torch.device("cpu"))
