"""MoE block forward+backward tokens/s against a dense SwiGLU of equal active parameters, as ratios in one run.

Usage: python bench/moe_block.py [--tokens N] [--repeats R] [--device cpu|cuda]
The MoE block (token choice, dropless, softmax router, balance + z losses) with E experts of
width F and top-k routing is compared with a dense SwiGLU of width k·F: the same matmul FLOPs
per token (plus the router). Both run the same random activations; the time covers forward and
backward; the best of the repeats is reported.
"""

from __future__ import annotations

import argparse
import time

import torch

from megamoe.config import ModelConfig, load_config
from megamoe.model.factory import LayerFactory
from megamoe.model.init import init_parameters
from megamoe.model.layers import SwiGLU
from megamoe.model.moe import MoEFFN
from megamoe.utils.host import describe_device


def timed(step, repeats: int, clock=time.perf_counter) -> float:
    """Best time of step() over repeats (after one warm-up), synchronizing CUDA: wall time, or clock's."""
    step()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = clock()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return best


def fwd_bwd(module, x: torch.Tensor):
    """One forward and backward pass of module on x (MoE losses included)."""

    def step():
        out = module(x)
        y, aux = out if isinstance(out, tuple) else (out, None)
        loss = y.float().pow(2).mean() + (sum(aux.losses.values()) if aux is not None else 0.0)
        loss.backward()

    return step


def main() -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dim, hidden, seqs = 256, 704, 16
    model = ModelConfig(d_model=dim, num_heads=4, seq_len=args.tokens // seqs, vocab_size=64, ffn_hidden_size=hidden)
    x = torch.randn(args.tokens // seqs, seqs, dim, device=args.device)
    threads = torch.get_num_threads()
    print(f"machine: {describe_device(args.device)}; torch {torch.__version__}, {threads} threads")
    print(f"d_model {dim}, expert width F {hidden}, {args.tokens} tokens, fp32, dropless top-k\n")
    print("| experts E | top-k | MoE tokens/s | dense (k·F) tokens/s | MoE / dense |\n|---|---|---|---|---|")
    for num_experts in (8, 32):
        for k in (1, 2):
            cfg = load_config(None, ["moe.routing=topk", f"moe.num_experts={num_experts}", f"moe.top_k={k}"]).moe
            moe = MoEFFN(model, cfg, LayerFactory()).to(args.device)
            dense = SwiGLU(dim, k * hidden, LayerFactory()).to(args.device)
            for module in (moe, dense):
                init_parameters(module, model, seed=0)
            t_moe = timed(fwd_bwd(moe, x), args.repeats)
            t_dense = timed(fwd_bwd(dense, x), args.repeats)
            rates = f"{args.tokens / t_moe:,.0f} | {args.tokens / t_dense:,.0f}"
            print(f"| {num_experts} | {k} | {rates} | {t_dense / t_moe:.2f} |")


if __name__ == "__main__":
    main()
