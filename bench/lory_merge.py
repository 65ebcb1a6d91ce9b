"""Lory's merged SwiGLU op: fused Triton kernels vs the reference vs a dense SwiGLU of the same shape.

Usage: python -m bench.lory_merge [--experts 8 16 32] [--seqs 16] [--seq-len 4096] [--dim 1024] [--hidden 2816]
       [--segment 256] [--dtype bf16] [--impls dense reference triton]
Issue 8's target shape (the defaults) is for the H200: bf16, d 1024, f 2816, T 256, 16 × 4096 tokens.
Times are medians of forward+backward (and of forward alone; backward = the difference), CUDA events
through triton.testing.do_bench on a GPU, perf_counter on the CPU. The inputs rotate among 3 random
sets so repeated runs do not measure a warm cache. FLOPs counted: a SwiGLU of the same shape
(6·N·D·F forward, twice that backward) plus the merges (fwd 3 merges, bwd 3 re-merges + 3 weight-
gradient folds + 3 dw contractions, each 2·E·D·F per segment); TFLOP/s is that count over the time,
against the bf16 matmul ceiling measured in the same run. Extra memory: peak allocated during
forward+backward above the inputs, parameters and their gradients (CUDA only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megamoe.ops.lory import merged_swiglu_reference
from megamoe.utils.host import describe_device

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dense_swiglu(x_STD, w_SE, gate_FD, up_FD, down_DF):
    """The dense SwiGLU of the same shape (torch matmuls: cuBLAS on a GPU); w_SE is ignored."""
    x_ND = x_STD.flatten(0, 1)
    return (F.silu(x_ND @ gate_FD.t()) * (x_ND @ up_FD.t())) @ down_DF.t()


def fused(x_STD, w_SE, gate, up, down):
    """The Triton path."""
    from megamoe.ops.lory_triton import merged_swiglu_triton

    return merged_swiglu_triton(x_STD, w_SE, gate, up, down)


IMPLS = {"dense": dense_swiglu, "reference": merged_swiglu_reference, "triton": fused}


def make_inputs(impl: str, args, experts: int, dtype, device, seed: int):
    """One random input set: x and routing weights in dtype, weights in dtype (bf16 training keeps bf16 copies)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    segs, dim, hidden = args.seqs * args.seq_len // args.segment, args.dim, args.hidden

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    x = rand(segs, args.segment, dim)
    mix = torch.randn(segs, experts, generator=gen, device=device).softmax(-1).to(dtype).requires_grad_()
    if impl == "dense":
        return [x, mix, rand(hidden, dim, scale=dim**-0.5), rand(hidden, dim, scale=dim**-0.5), rand(dim, hidden)]
    shapes = [(experts, hidden, dim), (experts, hidden, dim), (experts, dim, hidden)]
    return [x, mix, *(rand(*s, scale=s[2] ** -0.5) for s in shapes)]


def median_ms(fn, device: str, repeats: int) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=max(200, 40 * repeats), return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(impl: str, args, experts: int, dtype, device: str) -> dict:
    """Forward and forward+backward medians and the extra peak memory of one implementation."""
    sets = [make_inputs(impl, args, experts, dtype, device, seed) for seed in range(3)]
    fn, turn = IMPLS[impl], [0]

    def pick():
        turn[0] += 1
        return sets[turn[0] % 3]

    def forward():
        with torch.no_grad():
            fn(*pick())

    def step():
        inputs = pick()
        fn(*inputs).float().square().mean().backward()
        for t in inputs:
            t.grad = None

    fwd, both = median_ms(forward, device, args.repeats), median_ms(step, device, args.repeats)
    extra = 0
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, "extra_bytes": extra}


def flops(args, experts: int, with_merge: bool) -> float:
    """Forward+backward FLOPs: the dense SwiGLU's 18·N·D·F plus (Lory) 12 merge-sized passes per segment."""
    tokens = args.seqs * args.seq_len
    dense = 18.0 * tokens * args.dim * args.hidden
    segs = tokens // args.segment
    return dense + (12 * 2.0 * experts * args.dim * args.hidden * segs if with_merge else 0.0)


def matmul_ceiling(dtype, device: str) -> float:
    """TFLOP/s of one large matmul in dtype, measured now."""
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, 5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--impls", nargs="+", default=["dense", "reference", "triton"], choices=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype, device = DTYPES[args.dtype], args.device
    name = describe_device(device)
    ceiling = matmul_ceiling(dtype, device)
    print(f"{name}, torch {torch.__version__}, {args.dtype}; matmul ceiling {ceiling:.0f} TFLOP/s")
    print(f"D {args.dim}, F {args.hidden}, T {args.segment}, {args.seqs} × {args.seq_len} tokens\n")
    print("| E | impl | fwd ms | bwd ms | fwd+bwd ms | × dense | TFLOP/s | % ceiling | extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense = measure("dense", args, 1, dtype, device) if "dense" in args.impls else None
    for experts in args.experts:
        for impl in args.impls:
            m = dense if impl == "dense" else measure(impl, args, experts, dtype, device)
            rate = flops(args, experts, impl != "dense") / (m["fwd_bwd_ms"] * 1e-3) / 1e12
            ratio = m["fwd_bwd_ms"] / dense["fwd_bwd_ms"] if dense else float("nan")
            print(
                f"| {experts} | {impl} | {m['fwd_ms']:.2f} | {m['fwd_bwd_ms'] - m['fwd_ms']:.2f} | "
                f"{m['fwd_bwd_ms']:.2f} | {ratio:.2f} | {rate:.1f} | {100 * rate / ceiling:.0f}% | "
                f"{m['extra_bytes'] / 2**20:.0f} |"
            )


if __name__ == "__main__":
    main()
