"""The fused merge's self-check: it runs the real kernels (the interpreter here) and catches each way they fail.

Failures are planted in the kernel module itself: a block shape Triton cannot compile, a launch that
runs out of shared memory, a slightly wrong output, a wrong routing-weight gradient with a right output,
a NaN. On the CPU, `auto` resolves to the reference (Triton is CUDA-only), so the auto tests make the
resolution answer "triton" as it does on CUDA; the check behind it is the real code path.
"""

from __future__ import annotations

import logging
import os
import re
import time

import pytest
import torch

from megamoe.errors import MegamoeError
from megamoe.ops import lory, lory_check
from megamoe.ops.lory_check import class_size, select_merge_impl

pytest.importorskip("triton")
import megamoe_kernels.lory as kernels
from triton.runtime.errors import OutOfResources

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Each test starts with no cached result; the once-per-process resolution log is restored after it."""
    monkeypatch.setattr(lory_check, "_RESULTS", {})
    monkeypatch.setattr(lory, "_LOGGED", set())


def call_args(dtype=torch.float32, tokens=8):
    """x (S, T, D) and the gate weights (E, F, D) of a real call."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, tokens, 16, generator=gen).to(DEVICE, dtype), torch.randn(3, 24, 16).to(DEVICE)


def _scaled(fn, factor):
    """fn with its first result scaled (a wrong kernel)."""

    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0], out[1] * factor)
        return out * factor

    return wrong


def _nan(*args, **kwargs):
    """A merged matmul whose first element is NaN."""
    out = ORIGINAL["merged_matmul"](*args, **kwargs)
    out.view(-1)[0] = float("nan")
    return out


def _out_of_resources(*args, **kwargs):
    """What a GPU launch with too large a tile raises."""
    raise OutOfResources(262144, 232448, "shared memory")


ORIGINAL = {"merged_matmul": kernels.merged_matmul, "merged_weight_grad": kernels.merged_weight_grad}
PLANTED = {
    "compile": ("_block", lambda size, cap: 48, r"at compile or run: .*arange's range must be a power of 2"),
    "shared_memory": ("merged_weight_grad", _out_of_resources, r"OutOfResources.*shared memory"),
    "wrong_output": ("merged_matmul", _scaled(kernels.merged_matmul, 1.0001), r"^y relative error"),
    "wrong_routing_grad": (
        "merged_weight_grad", _scaled(kernels.merged_weight_grad, 1.01), r"^d routing weights relative error",
    ),
    "nan": ("merged_matmul", _nan, r"^y relative error inf"),
}  # fmt: skip


def test_passes_once_per_class_without_touching_the_global_rng(caplog):
    """Real kernels pass; the second call is a cache hit; the training RNG stream is unchanged."""
    x, gate = call_args()
    rng = torch.get_rng_state()
    with caplog.at_level("INFO", logger="megamoe.ops.lory_check"):
        assert select_merge_impl("triton", x, gate) == "triton"
    assert torch.equal(rng, torch.get_rng_state())
    start = time.perf_counter()
    assert select_merge_impl("triton", x, gate) == "triton"
    assert time.perf_counter() - start < 0.05
    assert caplog.text.count("self-check passed") == 1
    (result,) = lory_check._RESULTS.values()
    assert max(result.errors.values()) < lory_check.tolerance(torch.float32, DEVICE)
    select_merge_impl("triton", *call_args(torch.bfloat16))
    select_merge_impl("triton", *call_args(tokens=9))  # another shape class (T = 9)
    assert len(lory_check._RESULTS) == 3


def test_under_autocast_checks_the_autocast_dtype():
    """A training step's call (fp32 x under bf16 autocast) checks bf16 matmuls against the exact float64 loop."""
    x, gate = call_args()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert select_merge_impl("triton", x, gate) == "triton"
    (result,) = lory_check._RESULTS.values()
    assert (result.key.dtype, result.key.x_dtype) == (torch.bfloat16, torch.float32)
    assert 1e-3 < result.errors["y"] < lory_check.tolerance(torch.bfloat16, DEVICE)


@pytest.mark.parametrize("failure", list(PLANTED))
def test_triton_stops_with_what_failed(monkeypatch, failure):
    """Explicit triton: a planted kernel defect is one MegamoeError naming the check, the failure and what to do."""
    name, planted, message = PLANTED[failure]
    monkeypatch.setattr(kernels, name, planted)
    with pytest.raises(MegamoeError) as err:
        select_merge_impl("triton", *call_args())
    text = str(err.value)
    assert text.startswith("moe.merge_impl: the fused Triton merge failed its self-check on cpu float32 (E=3 T=8")
    assert "moe.merge_impl=auto or reference" in text and "megamoe doctor" in text
    (result,) = lory_check._RESULTS.values()
    assert re.search(message, result.failure), result.failure


@pytest.mark.parametrize("failure", ["compile", "wrong_routing_grad"])
def test_auto_falls_back_with_one_warning(monkeypatch, caplog, failure):
    """auto (resolved to triton, as on CUDA): the reference, and a single warning however often it is asked."""
    name, planted, _ = PLANTED[failure]
    monkeypatch.setattr(kernels, name, planted)
    monkeypatch.setattr(lory_check, "resolve_merge_impl", lambda impl, device: "triton")
    with caplog.at_level(logging.WARNING, logger="megamoe.ops.lory_check"):
        assert [select_merge_impl("auto", *call_args()) for _ in range(3)] == ["reference"] * 3
    (record,) = caplog.records
    assert "failed its self-check on cpu float32" in record.message
    assert "using the reference merge" in record.message and "megamoe doctor" in record.message


def test_lory_layer_under_auto_falls_back_to_the_reference(monkeypatch):
    """A whole Lory layer with a wrong kernel under auto gives the reference layer's output exactly."""
    from megamoe.config import ModelConfig, load_config
    from megamoe.model import LayerFactory
    from megamoe.model.init import init_parameters
    from megamoe.model.moe.lory import LoryFFN

    model = ModelConfig(d_model=16, num_layers=1, num_heads=2, seq_len=16, vocab_size=50, ffn_hidden_size=24)
    moe = load_config(None, ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8"]).moe
    layer = LoryFFN(model, moe, LayerFactory()).to(DEVICE)
    init_parameters(layer, model, seed=3)
    x = torch.randn(16, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    moe.merge_impl = "reference"
    want, _ = layer(x)
    monkeypatch.setattr(kernels, "merged_matmul", _scaled(kernels.merged_matmul, 1.0001))
    monkeypatch.setattr(lory_check, "resolve_merge_impl", lambda impl, device: "triton")
    moe.merge_impl = "auto"
    got, _ = layer(x)
    assert torch.equal(got, want)
    moe.merge_impl = "triton"
    with pytest.raises(MegamoeError, match="y relative error"):
        layer(x)


@pytest.mark.parametrize("size", [1, 9, 20, 64, 100, 128, 129, 200, 256, 1000, 1024, 2816, 4097])
def test_shape_class_keeps_blocks_tails_and_alignment(size):
    """The small case compiles the same kernel variants: tile edges, tails mod every tile, divisibility by 16."""
    small = class_size(size)
    assert small <= 192
    for cap in (16, 32, 64):
        assert kernels._block(small, cap) == kernels._block(size, cap)
        block = kernels._block(size, cap)
        assert small % block == size % block or size < block
    assert (small % 16 == 0) == (size % 16 == 0) and (small == 1) == (size == 1)
