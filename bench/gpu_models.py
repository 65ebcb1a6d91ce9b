"""Whole-model forward+backward throughput of every routing family at the 0.3B shape (issue 11).

Usage: python -m bench.gpu_models [--batch 2] [--seq-len 4096] [--dtype bf16] [--variants ...] [--tiny]
Models: configs/paper/lory_0.3b_dense.yaml and its MoE variants at the same active size (8 experts
of the dense width: Lory with the reference and the Triton merge, top-2 dropless with experts of
half width, expert choice c = 1, GRIN top-2, RMoE top-2). One run, synthetic tokens, median
forward+backward time (loss.backward, no optimizer step). TFLOP/s counts the model FLOPs per
token the trainer logs (6 × active matmul parameters + attention 6·L·s·d per token, + Lory's
merge), as megatron-core counts them, over the time; against the bf16 matmul ceiling measured
in the same run. Peak memory: CUDA's max allocated during the step. `--tiny`: a CPU smoke test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.lory_merge import DTYPES, matmul_ceiling, median_ms

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
HALF = "moe.expert_hidden_size=1408"
VARIANTS = {
    "dense": ("lory_0.3b_dense.yaml", []),
    "lory 8E (reference merge)": ("lory_0.3b_8e.yaml", ["moe.merge_impl=reference"]),
    "lory 8E (triton merge)": ("lory_0.3b_8e.yaml", ["moe.merge_impl=triton"]),
    "top-2 8E dropless": ("lory_0.3b_top1_8e.yaml", ["moe.top_k=2", HALF]),
    "expert choice 8E c=1": ("lory_0.3b_ec_8e.yaml", []),
    "GRIN top-2 8E": ("lory_0.3b_top1_8e.yaml", ["moe.routing=sparsemixer", "moe.top_k=2", HALF]),
    "RMoE top-2 8E": ("lory_0.3b_top1_8e.yaml", ["moe.scorer=gru", "moe.top_k=2", HALF]),
}
TINY = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
        "model.vocab_size=512", "moe.segment_length=32"]  # fmt: skip


def build(name: str, args, device: str):
    """(model, FLOPs per token, active parameters) of one variant."""
    from megamoe.config import load_config
    from megamoe.model import build_model
    from megamoe.model.params import count_parameters, flops_per_token

    path, overrides = VARIANTS[name]
    extra = [f"model.seq_len={args.seq_len}"]
    if args.tiny:  # experts of half the (tiny) dense width where the variant halves them
        extra += [*TINY, f"moe.expert_hidden_size={64 if HALF in overrides else 0}"]
    cfg = load_config(PAPER / path, [*overrides, *extra])
    model = build_model(cfg.model, 0, moe=cfg.moe).to(device)
    counts = count_parameters(model)
    return model, flops_per_token(cfg.model, counts, cfg.moe), counts.active


def measure(name: str, args, device: str) -> dict:
    """Median fwd+bwd ms, tokens/s, TFLOP/s and peak memory of one variant."""
    model, flops, active = build(name, args, device)
    dtype = DTYPES[args.dtype]
    vocab = model.cfg.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len + 1), device=device) for _ in range(3)]
    turn = [0]

    def step():
        turn[0] += 1
        ids = batches[turn[0] % 3]
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids[:, :-1], ids[:, 1:])
        (out.token_loss_BL.mean() + out.aux_loss).backward()
        model.zero_grad(set_to_none=True)

    ms = median_ms(step, device, args.repeats)
    peak = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    tokens = args.batch * args.seq_len
    return {"ms": ms, "tokens_s": tokens / ms * 1e3, "tflops": flops * tokens / (ms * 1e-3) / 1e12,
            "active": active, "peak": peak}  # fmt: skip


def main() -> None:
    """Print the table (ratios to dense measured in the same run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: d 64, 2 layers, seq 128, fp32")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.seq_len, args.dtype, args.repeats = 128, "fp32", 2
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    ceiling = matmul_ceiling(DTYPES[args.dtype], device)
    print(f"{name}, torch {torch.__version__}, {args.dtype}, {args.batch} × {args.seq_len} tokens; "
          f"matmul ceiling {ceiling:.1f} TFLOP/s\n")  # fmt: skip
    print("| model | active params | fwd+bwd ms | tokens/s | × dense | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    dense = None
    for variant in args.variants:
        try:
            m = measure(variant, args, device)
        except Exception as err:  # a variant that cannot run here (e.g. the Triton merge without CUDA)
            print(f"| {variant} | skipped: {type(err).__name__}: {str(err).splitlines()[0][:80]} | | | | | | |")
            continue
        dense = dense or (m if variant == "dense" else None)
        ratio = m["tokens_s"] / dense["tokens_s"] if dense else float("nan")
        print(f"| {variant} | {m['active'] / 1e6:.1f}M | {m['ms']:.1f} | {m['tokens_s']:,.0f} | {ratio:.2f} | "
              f"{m['tflops']:.1f} | {100 * m['tflops'] / ceiling:.0f}% | {m['peak'] / 2**30:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
