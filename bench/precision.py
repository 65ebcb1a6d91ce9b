"""bf16 autocast against fp32 on the CPU: training-step speed of each routing family at two model widths.

Usage: python -m bench.precision [--steps N] [--rounds R] [--widths 128 256]
For every (family, width) the fp32 and bf16 steps run in turn on the same weights and batch, round
after round, so the machine's load drifts over both alike; each figure is the median step time over
rounds. A step is the forward, backward and AdamW update of one 8 × 256-token batch (fp32 master
weights in both: `train.precision=bf16` is autocast). Synthetic tokens, no data preparation.
The study width is 128 (docs/results.md); 256 is `megamoe train`'s default model.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from megamoe.config import load_config
from megamoe.model import build_model
from megamoe.train.optim import build_optimizer
from megamoe.utils.host import describe_cpu, native_bf16

FAMILIES = {
    "dense": [],
    "top-2": ["moe.routing=topk", "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=1.25"],
    "GRIN": ["moe.routing=sparsemixer", "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=0"],
    "Lory": ["moe.routing=lory", "moe.num_experts=8", "moe.segment_length=64"],
}


def shape(width: int, family: str) -> list[str]:
    """The study's shape at this width: 4 layers, FFN 3·width active per token (2 experts of 1.5·width)."""
    expert = width * 3 if family == "Lory" else width * 3 // 2
    return [
        f"model.d_model={width}", "model.num_layers=4", "model.num_heads=4", f"model.ffn_hidden_size={3 * width}",
        "model.seq_len=256", "model.vocab_size=4096", f"moe.expert_hidden_size={expert}", "moe.moe_every=1",
    ]  # fmt: skip


class Case:
    """One model, its optimizer and a fixed batch."""

    def __init__(self, overrides: list[str]):
        cfg = load_config(None, overrides)
        self.model = build_model(cfg.model, 0, moe=cfg.moe)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.tokens = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len + 1))

    def step(self, bf16: bool) -> float:
        """Seconds of one training step."""
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = self.model(self.tokens[:, :-1], self.tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure(case: Case, steps: int, rounds: int) -> dict[bool, float]:
    """Median seconds per step of fp32 (False) and bf16 (True), interleaved by round."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (False, True):
        case.step(bf16)  # warm-up: first-call allocations and kernel selection
    for _ in range(rounds):
        for bf16 in (False, True):
            times[bf16].append(sum(case.step(bf16) for _ in range(steps)) / steps)
    return {bf16: statistics.median(values) for bf16, values in times.items()}


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    args = parser.parse_args()
    native = native_bf16()
    print(f"machine: {describe_cpu()}; bf16 instructions: {native or 'none'}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 8 × 256 tokens per step\n")
    print("| family | d_model | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for width in args.widths:
        for family, overrides in FAMILIES.items():
            seconds = measure(Case([*shape(width, family), *overrides]), args.steps, args.rounds)
            fp32, bf16 = (8 * 256 / seconds[b] for b in (False, True))
            print(f"| {family} | {width} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
