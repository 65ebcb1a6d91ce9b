"""Memory and step time of the head fused with the loss (train.loss_chunk_tokens) against the plain path.

Usage: python -m bench.fused_loss [--steps N] [--chunks 512 2048] [--sizes crossover vocab32k] [--smoke]
A step is the forward and backward of one micro-batch through the whole model. Per model the plain
path and every chunk size run in turn on the same weights and batch, round after round, and each
figure is the median over rounds; ratios are to the plain path of the same run. Measures as in
bench/recompute.py: saved bytes (autograd's saved tensors), the peak resident set size above the
step's start (CPU; the allocator's peak on CUDA), this thread's CPU time and wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch

from bench.lory_layer import saved_bytes
from bench.recompute import FIELDS, MALLOC, step
from megamoe.config import load_config
from megamoe.model import build_model

SIZES = {
    "crossover": ["model.vocab_size=4096", "model.d_model=128", "model.num_layers=4", "model.num_heads=4",
                  "model.ffn_hidden_size=384", "model.seq_len=256", "train.micro_batch_size=16"],
    "vocab32k": ["model.vocab_size=32768", "model.d_model=256", "model.num_layers=4", "model.num_heads=4",
                 "model.seq_len=256", "train.micro_batch_size=8"],
    "smoke": ["model.vocab_size=512", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
              "model.seq_len=64", "train.micro_batch_size=2"],
}  # fmt: skip
"""crossover: the budget-crossover study's dense model (docs/results.md); vocab32k: a vocabulary 8× larger."""


def measure(overrides: list[str], chunks: list[int], rounds: int, device: torch.device) -> dict[int, dict]:
    """Per chunk size (0 = plain): saved bytes, and the median peak bytes, CPU and wall seconds of a step."""
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, 0).to(device).train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1), generator=gen)
    tokens = tokens.to(device)
    runs: dict[int, list[tuple[float, float, int]]] = {c: [] for c in chunks}
    saved = {}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for chunk in chunks:
            model.loss_chunk_tokens = chunk
            if r == 0:
                saved[chunk] = saved_bytes(lambda: model(tokens[:, :-1], tokens[:, 1:]), model)
            result = step(model, tokens)
            if r > 0:
                runs[chunk].append(result)
    return {
        c: {"saved": saved[c], "peak": statistics.median(p for _, _, p in runs[c]),
            "seconds": statistics.median(s for s, _, _ in runs[c]), "cpu": statistics.median(u for _, u, _ in runs[c])}
        for c in chunks
    }  # fmt: skip


def main() -> None:
    """Print the machine and one table row per (size, chunk)."""
    if sys.platform == "linux" and MALLOC not in os.environ and not torch.cuda.is_available():
        os.execve(sys.executable, sys.orig_argv, {**os.environ, MALLOC: "65536"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["crossover", "vocab32k"], choices=list(SIZES))
    ap.add_argument("--chunks", nargs="+", type=int, default=[512, 2048], help="train.loss_chunk_tokens values")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (each runs every chunk size once)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: CPU time is all on this thread)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one timed round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes, rounds = (["smoke"], 1) if args.smoke else (args.sizes, args.steps)
    chunks = [0, *args.chunks]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = "peak allocated" if device.type == "cuda" else "peak RSS"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {device.type}, fp32; load {os.getloadavg()}\n")  # fmt: skip
    print(f"| model | loss | saved MiB | saved / plain | {memory} MiB | peak / plain | step CPU ms | CPU / plain "
          "| step wall ms | wall / plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        res = measure(SIZES[size], chunks, rounds, device)
        for chunk, r in res.items():
            cells = [f"{r[k] / s:,.{d}f} | {r[k] / res[0][k]:.2f}" for k, s, d in FIELDS]
            label = f"fused, {chunk} tokens" if chunk else "plain"
            print(f"| {size} | {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
