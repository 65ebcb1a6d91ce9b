"""Memory and step time of the head fused with the loss (train.loss_chunk_tokens) against the plain path.

Usage: python -m bench.fused_loss [--steps N] [--chunks 512 2048] [--sizes crossover vocab32k] [--smoke]
A step is the forward and backward of one micro-batch through the whole model. Per model the plain
path and every chunk size run in turn on the same weights and batch, round after round, and each
figure is the median over rounds; ratios are to the plain path of the same run. Measures as in
bench/recompute.py: saved bytes (autograd's saved tensors), the peak resident set size above the
step's start (CPU; the allocator's peak on CUDA), this thread's CPU time and wall time.
"""

from __future__ import annotations

import torch

from bench.recompute import cells, compare, header, model_and_batch, parse_args

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
    model, tokens = model_and_batch(overrides, device)
    settings = {chunk: lambda chunk=chunk: setattr(model, "loss_chunk_tokens", chunk) for chunk in chunks}
    return compare(model, tokens, settings, rounds)


def _chunks_arg(ap) -> None:
    """--chunks: the train.loss_chunk_tokens values measured beside the plain path."""
    ap.add_argument("--chunks", nargs="+", type=int, default=[512, 2048], help="train.loss_chunk_tokens values")


def main() -> None:
    """Print the machine and one table row per (size, chunk)."""
    args, sizes, rounds = parse_args(__doc__, SIZES, ["crossover", "vocab32k"], _chunks_arg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header("loss", "plain", device)
    for size in sizes:
        res = measure(SIZES[size], [0, *args.chunks], rounds, device)
        for chunk, r in res.items():
            label = f"fused, {chunk} tokens" if chunk else "plain"
            print(f"| {size} | {label} | {cells(r, res[0])} |", flush=True)


if __name__ == "__main__":
    main()
