"""The fused CPU merge (megamoe/ops/lory_cpu.c) against the float64 loop, and its build and fallbacks.

Tolerances (‖got − ref‖ / ‖ref‖ over the output and all five gradients): fp32 < 1e-5, the bound of
tests/kernels/test_lory_triton.py and the self-check — sums of at most a few thousand fp32 products
(inner lengths D, T, F and F·D per tile) at unit scale carry relative errors of order 1e-7·√n; the
measured errors are 1e-7 to 4e-7, the reference path's own. fp64 < 1e-13 by the same argument with
unit roundoff 1.1e-16 (measured ≤ 1.3e-15). Shapes are not tile multiples: F tails, a ragged last block
of segments, E = 1, more threads than tiles.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from megamoe.errors import ConfigError, MegamoeError
from megamoe.ops import lory, lory_check, lory_cpu
from megamoe.ops.lory import merged_swiglu_reference, resolve_merge_impl
from megamoe.ops.lory_check import select_merge_impl
from megamoe.ops.reference import merged_swiglu_loop

if shutil.which(lory_cpu._compiler()) is None:
    pytest.skip(f"no C compiler ({lory_cpu._compiler()}): the fused CPU merge cannot be built", allow_module_level=True)

BOUND = {torch.float32: 1e-5, torch.float64: 1e-13}
NAMES = ("y", "dx", "dw", "dW_gate", "dW_up", "dW_down")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """No cached self-check results or resolution logs leak between tests."""
    monkeypatch.setattr(lory_check, "_RESULTS", {})
    monkeypatch.setattr(lory, "_LOGGED", set())


@pytest.fixture
def threads():
    """Restores the intra-op thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def inputs(segments, seg_len, dim, hidden, experts, seed=0):
    """x, routing weights (rows on the simplex), gate, up, down in float64, scaled to unit outputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(segments, seg_len, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(segments, experts, generator=gen, dtype=torch.float64).softmax(-1)
    gate = torch.randn(experts, hidden, dim, generator=gen, dtype=torch.float64) / dim**0.5
    up = torch.randn(experts, hidden, dim, generator=gen, dtype=torch.float64) / dim**0.5
    down = torch.randn(experts, dim, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    return [x, w, gate, up, down]


def run(fn, args, dtype, cot):
    """fn's output and the gradients of ⟨out, cot⟩ for all five inputs, in float64."""
    leaves = [a.detach().to(dtype).requires_grad_() for a in args]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, cot.to(dtype))
    return [t.detach().double() for t in (out, *grads)]


def errors(got, want):
    """Relative error of each output/gradient."""
    return {name: ((g - w).norm() / w.norm()).item() for name, g, w in zip(NAMES, got, want, strict=True)}


SHAPES = [  # (S, T, D, F, E)
    (5, 9, 16, 40, 3),
    (7, 17, 24, 33, 5),
    (3, 8, 8, 16, 1),
    (40, 20, 32, 400, 12),  # several tiles with a tail, several blocks (see test body)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_equals_the_float64_loop(monkeypatch, dtype, shape):
    """Output and all five gradients within the dtype's bound, over tiles, blocks and their tails."""
    monkeypatch.setattr(lory_cpu, "BLOCK_BYTES", 3 * 16 * shape[2] * 8 * 7)  # blocks of ~7 segments
    monkeypatch.setattr(lory_cpu, "TILE_COLUMNS", 64)
    args = inputs(*shape)
    cot = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = run(merged_swiglu_loop, args, torch.float64, cot)
    err = errors(run(lory_cpu.merged_swiglu_fused, args, dtype, cot), want)
    assert max(err.values()) < BOUND[dtype], err


@pytest.mark.parametrize("count", [1, 2, 3])
def test_thread_counts_agree_and_repeat_bitwise(threads, count):
    """Any thread count is within the fp32 bound of the loop; one count gives the same bits every call (two tiles:
    one worker, one group of two workers, three groups of one)."""
    torch.set_num_threads(count)
    args = inputs(6, 8, 16, 200, 4)
    cot = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first = run(lory_cpu.merged_swiglu_fused, args, torch.float32, cot)
    assert max(errors(first, run(merged_swiglu_loop, args, torch.float64, cot)).values()) < BOUND[torch.float32]
    again = run(lory_cpu.merged_swiglu_fused, args, torch.float32, cot)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_backward_at_another_thread_count(threads):
    """Forward at 2 threads, backward at 1 (the tile layout of the saved pre-activations is the forward's)."""
    args = inputs(6, 8, 16, 400, 4)  # 4 tiles of 100 columns at 2 threads, 3 of 134 at 1
    cot = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaves = [a.detach().float().requires_grad_() for a in args]
    torch.set_num_threads(2)
    out = lory_cpu.merged_swiglu_fused(*leaves)
    torch.set_num_threads(1)
    got = [out.detach().double(), *(g.double() for g in torch.autograd.grad(out, leaves, cot.float()))]
    assert max(errors(got, run(merged_swiglu_loop, args, torch.float64, cot)).values()) < BOUND[torch.float32]


@pytest.mark.parametrize(
    ("case", "count", "tiles", "segments", "groups"),
    [
        ("fewer threads than tiles: one group", 2, 4, 32, 1),
        ("three threads, four tiles: one group of three", 3, 4, 32, 1),
        ("many threads: groups of four", 16, 4, 32, 4),
        ("eight threads", 8, 4, 32, 2),
        ("six threads: two groups of three", 6, 4, 32, 2),
        ("a prime count above the tiles: one worker per group", 5, 4, 32, 5),
        ("no more groups than segments", 16, 4, 2, 2),
        ("one segment", 16, 4, 1, 1),
        ("one thread", 1, 4, 32, 1),
    ],
)
def test_segment_groups(case, count, tiles, segments, groups):
    """Threads beyond the tiles work on separate segments rather than narrower tiles; groups never exceed segments."""
    assert lory_cpu.segment_groups(count, tiles, segments) == groups, case


GROUPED = [  # (threads, (S, T, D, F, E)): every case splits into several segment groups
    (3, (7, 9, 16, 100, 3)),  # three groups of 2, 2, 3 segments (blocks of 2: the third group runs a block alone)
    (4, (11, 8, 24, 100, 5)),  # two groups of two workers, two tiles of 50 columns each
    (4, (4, 6, 8, 20, 1)),  # four groups of one segment, E = 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("count", "shape"), GROUPED)
def test_segment_groups_equal_the_float64_loop(monkeypatch, threads, dtype, count, shape):
    """With more threads than tiles: output and all five gradients within the dtype's bound, and bitwise repeats."""
    monkeypatch.setattr(lory_cpu, "BLOCK_BYTES", 3 * 64 * shape[2] * dtype.itemsize * 2)  # blocks of ≤ 2 segments
    monkeypatch.setattr(lory_cpu, "TILE_COLUMNS", 64)
    torch.set_num_threads(count)
    dims = lory_cpu._dims(*shape[:4], shape[4], dtype.itemsize)
    assert dims.groups > 1 and dims.sb <= 2, (dims.groups, dims.sb)
    args = inputs(*shape)
    cot = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = run(lory_cpu.merged_swiglu_fused, args, dtype, cot)
    err = errors(got, run(merged_swiglu_loop, args, torch.float64, cot))
    assert max(err.values()) < BOUND[dtype], err
    assert all(torch.equal(a, b) for a, b in zip(got, run(lory_cpu.merged_swiglu_fused, args, dtype, cot)))


def test_backward_with_other_groups_than_forward(threads):
    """Forward at 4 threads (two groups of two workers, two tiles of 150), backward at 3 (three groups, same tiles)."""
    args = inputs(9, 8, 16, 300, 4)
    cot = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = [a.detach().float().requires_grad_() for a in args]
    torch.set_num_threads(4)
    assert lory_cpu._dims(9, 8, 16, 300, 4, 4).groups == 2
    out = lory_cpu.merged_swiglu_fused(*leaves)
    torch.set_num_threads(3)
    assert lory_cpu._dims(9, 8, 16, 300, 4, 4, columns=150).groups == 3
    got = [out.detach().double(), *(g.double() for g in torch.autograd.grad(out, leaves, cot.float()))]
    assert max(errors(got, run(merged_swiglu_loop, args, torch.float64, cot)).values()) < BOUND[torch.float32]


def test_mixed_dtypes_take_the_reference():
    """fp64 x with fp32 experts: `cpu` resolves to the reference for the call (the kernel needs one dtype)."""
    x, _, gate, *_ = inputs(4, 8, 16, 24, 3)
    assert select_merge_impl("cpu", x, gate.float()) == "reference"
    assert select_merge_impl("cpu", x, gate) == "cpu"


def test_gradcheck_float64():
    """torch.autograd.gradcheck: the analytic backward against finite differences of the forward."""
    args = [a.requires_grad_() for a in inputs(3, 5, 6, 7, 3)]
    assert torch.autograd.gradcheck(lory_cpu.merged_swiglu_fused, args, eps=1e-6, atol=1e-8)


def test_only_the_requested_gradients():
    """x and the routing weights without requires_grad get none; the expert gradients still match the loop."""
    x, w, *weights = inputs(4, 6, 8, 20, 3)
    leaves = [t.float().requires_grad_() for t in weights]
    out = lory_cpu.merged_swiglu_fused(x.float(), w.float(), *leaves)
    out.square().sum().backward()
    exact = [t.clone().requires_grad_() for t in weights]
    merged_swiglu_loop(x, w, *exact).square().sum().backward()
    for got, want in zip(leaves, exact):
        assert ((got.grad.double() - want.grad).norm() / want.grad.norm()).item() < BOUND[torch.float32]
    assert leaves[2].grad.is_contiguous()


def test_lory_layer_cpu_matches_reference():
    """A whole Lory layer (ragged last segment) under merge_impl=cpu against reference: output and gradients."""
    from megamoe.config import ModelConfig, load_config
    from megamoe.model import LayerFactory
    from megamoe.model.init import init_parameters
    from megamoe.model.moe.lory import LoryFFN

    model = ModelConfig(d_model=16, num_layers=1, num_heads=2, seq_len=22, vocab_size=50, ffn_hidden_size=24)
    moe = load_config(None, ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8"]).moe
    layer = LoryFFN(model, moe, LayerFactory())
    init_parameters(layer, model, seed=3)
    x = torch.randn(22, 2, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("reference", "cpu"):
        moe.merge_impl = impl
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        out.square().sum().backward()
        results[impl] = [out, xi.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]
    for got, want in zip(results["cpu"], results["reference"], strict=True):
        assert ((got - want).norm() / want.norm()).item() < 2 * BOUND[torch.float32]


def test_auto_picks_cpu_and_bf16_autocast_takes_the_reference():
    """auto on the CPU resolves to the fused kernel; under bf16 autocast the call goes to the reference."""
    x, w, *weights = (t.float() for t in inputs(4, 8, 16, 24, 3))
    assert resolve_merge_impl("auto", x.device) == "cpu"
    assert select_merge_impl("auto", x, weights[0]) == "cpu"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert select_merge_impl("auto", x, weights[0]) == "reference"
        got = lory.merged_swiglu(x, w, *weights, impl="cpu")
        want = merged_swiglu_reference(x, w, *weights)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def _scaled(fn, factor):
    """fn with its output scaled (a wrong kernel)."""
    return lambda *args: fn(*args) * factor


def test_explicit_cpu_stops_on_a_wrong_kernel(monkeypatch):
    """A planted defect (output off by 1e-4) is one MegamoeError naming the check and what to do."""
    monkeypatch.setattr(lory_cpu, "merged_swiglu_fused", _scaled(lory_cpu.merged_swiglu_fused, 1.0001))
    x, _, gate, *_ = (t.float() for t in inputs(4, 8, 16, 24, 3))
    with pytest.raises(MegamoeError) as err:
        select_merge_impl("cpu", x, gate)
    assert str(err.value).startswith("moe.merge_impl: the fused CPU merge failed its self-check on cpu float32")
    assert "y relative error" in str(err.value) and "megamoe doctor" in str(err.value)


def test_auto_falls_back_on_a_wrong_kernel_with_one_warning(monkeypatch, caplog):
    """auto: the reference, and a single warning however often it is asked."""
    monkeypatch.setattr(lory_cpu, "merged_swiglu_fused", _scaled(lory_cpu.merged_swiglu_fused, 1.0001))
    x, _, gate, *_ = (t.float() for t in inputs(4, 8, 16, 24, 3))
    with caplog.at_level(logging.WARNING, logger="megamoe.ops.lory_check"):
        assert [select_merge_impl("auto", x, gate) for _ in range(3)] == ["reference"] * 3
    (record,) = caplog.records
    assert "the fused CPU merge failed its self-check" in record.message


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded kernels (restored afterwards)."""
    monkeypatch.setenv("MEGAMOE_KERNEL_CACHE", str(tmp_path / "kernels"))
    lory_cpu._load.cache_clear()
    yield tmp_path / "kernels"
    lory_cpu._load.cache_clear()


def test_builds_once_per_machine_and_loads_from_the_cache(fresh_build):
    """The first use compiles into the cache; another process then loads it without compiling."""
    assert lory_cpu.unavailable(torch.float32) is None
    (built,) = fresh_build.glob("lory_cpu_float_*.so")
    stamp = built.stat().st_mtime_ns
    code = "import torch; from megamoe.ops import lory_cpu; assert lory_cpu.unavailable(torch.float32) is None"
    env = {**os.environ, "MEGAMOE_KERNEL_CACHE": str(fresh_build)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert built.stat().st_mtime_ns == stamp and len(list(fresh_build.iterdir())) == 1


def test_a_killed_build_leaves_nothing_for_the_next(fresh_build):
    """A build killed with SIGKILL leaves its temporary file; the next load removes it once it is too old to
    belong to a running build (whether it builds or finds the library cached)."""
    fresh_build.mkdir(parents=True)
    orphan = fresh_build / f"{lory_cpu.TMP_PREFIX}killed.so"
    orphan.write_bytes(b"half")
    old = time.time() - 3 * lory_cpu.BUILD_TIMEOUT_S
    os.utime(orphan, (old, old))
    young = fresh_build / f"{lory_cpu.TMP_PREFIX}running.so"
    young.write_bytes(b"in progress")
    assert lory_cpu.unavailable(torch.float32) is None
    assert not orphan.exists() and young.exists()
    assert len(list(fresh_build.glob("lory_cpu_float_*.so"))) == 1
    orphan.write_bytes(b"killed after the library was built")  # the next process loads from the cache
    os.utime(orphan, (old, old))
    lory_cpu._load.cache_clear()
    assert lory_cpu.unavailable(torch.float32) is None and not orphan.exists()


def test_no_compiler_falls_back_or_names_the_key(fresh_build, monkeypatch, caplog):
    """A compiler that fails: auto takes the reference with one warning; explicit cpu is a ConfigError."""
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger="megamoe.ops.lory_cpu"):
        assert resolve_merge_impl("auto", torch.device("cpu")) == "reference"
        assert resolve_merge_impl("auto", torch.device("cpu")) == "reference"
    (record,) = caplog.records
    assert "the reference path runs instead" in record.message and "failed (1)" in record.message
    with pytest.raises(ConfigError, match=r"moe\.merge_impl: cpu: the fused CPU kernel could not be built"):
        resolve_merge_impl("cpu", torch.device("cpu"))
    assert list(fresh_build.iterdir()) == []  # no half-written library left behind
