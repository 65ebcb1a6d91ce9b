"""Training throughput of the default dense model and a few variants, as ratios in one run.

Usage: python bench/train_throughput.py [--steps N]. Synthetic tokens (no data prep); each variant
runs warm-up steps, then timed optimizer steps of the default batch (16 × 256 tokens).
"""

from __future__ import annotations

import argparse
import time

import torch

from megamoe.config import load_config
from megamoe.model import build_model
from megamoe.model.params import count_parameters, flops_per_token
from megamoe.train.flops import measure_matmul_tflops
from megamoe.train.optim import build_optimizer
from megamoe.utils.host import describe_cpu

VARIANTS = {
    "default (d256 L4 h4)": [],
    "gqa kv=2": ["model.num_kv_heads=2"],
    "tied embeddings": ["model.tie_embeddings=true"],
    "seq 512": ["model.seq_len=512", "train.global_batch_size=8", "train.micro_batch_size=8"],
}


def time_variant(overrides: list[str], steps: int, warmup: int = 2) -> tuple[float, float]:
    """(tokens/s, training FLOPs per token) of one config."""
    cfg = load_config(None, ["model.vocab_size=4096", *overrides])
    model = build_model(cfg.model, 0)
    opt = build_optimizer(model, cfg.optim)
    batch, seq = cfg.train.micro_batch_size, cfg.model.seq_len
    accum = cfg.train.global_batch_size // batch
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1))
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad()
        for _ in range(accum):
            (model(tokens[:, :-1], tokens[:, 1:]).loss / accum).backward()
        opt.step()
    seconds = time.perf_counter() - start
    tps = steps * cfg.train.global_batch_size * seq / seconds
    return tps, flops_per_token(cfg.model, count_parameters(model), cfg.moe)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    peak = measure_matmul_tflops()
    print(f"machine: {describe_cpu()}; {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"fp32 matmul peak (1024², measured): {peak:.3f} TFLOP/s\n")
    print("| variant | tokens/s | ratio to default | MFU vs measured matmul |")
    print("|---|---|---|---|")
    base = None
    for name, overrides in VARIANTS.items():
        tps, fpt = time_variant(overrides, args.steps)
        base = base or tps
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f} | {tps * fpt / (peak * 1e12):.1%} |")


if __name__ == "__main__":
    main()
