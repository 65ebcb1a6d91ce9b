"""Lory layer forward+backward time and memory against a dense SwiGLU of the same active size.

Usage: python -m bench.lory_layer [--tokens N] [--repeats R] [--rounds N] [--experts E ...] [--segments T ...]
       [--threads N ...] [--device cpu|cuda] [--impl reference|triton|cpu|auto ...]
A Lory layer with E experts of width F merges all three matrices once per segment of T tokens;
every token then goes through one merged FFN of width F — the dense SwiGLU of width F is the
same active size. Memory: on CUDA the peak allocated during forward+backward above what was
allocated before; on CPU (no allocator statistics) the activations autograd saves for backward,
parameters excluded — what the merge recomputation keeps small. Ratios are Lory / dense, measured in one run:
with --rounds N, the median (and range) of N interleaved rounds' ratios, for a machine shared with other work.
--threads 1 2 measures each intra-op thread count in every round: the ratio depends on it on CPU
(the dense GEMM gains more from a second core than the Lory layer's memory-bound merges).
--impl reference cpu measures each merge path (moe.merge_impl) in every round, for an A/B in one run.
--input-grad makes the input require grad, as every FFN's input does inside a model: backward then also
computes dx (for dense and Lory alike), which the default measurement leaves out.
--clock process times the process's CPU seconds (all threads) instead of the wall clock: the work a step
costs. Run with more --threads than cores and OMP_WAIT_POLICY=passive, it shows the extra work a thread
count adds (partial sums, narrower tiles), which a machine with that many cores would pay in time; it is
not a speed (the threads share the cores, and their caches).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.moe_block import fwd_bwd, timed
from megamoe.config import ModelConfig, load_config
from megamoe.model.factory import LayerFactory
from megamoe.model.init import init_parameters
from megamoe.model.layers import SwiGLU
from megamoe.model.moe.lory import LoryFFN
from megamoe.ops.lory import resolve_merge_impl
from megamoe.utils.host import describe_device


def saved_bytes(step, module: torch.nn.Module) -> int:
    """Bytes of the activations autograd keeps for backward during one step (distinct storages, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def peak_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """CUDA: peak allocated above the baseline during forward+backward; CPU: activations saved for backward."""
    step = fwd_bwd(module, x)
    if x.device.type != "cuda":
        return saved_bytes(step, module)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="fwd+bwd passes per timing; the best counts")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds: dense, then every Lory config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--impl", nargs="+", default=["auto"], choices=("reference", "triton", "cpu", "auto"), help="moe.merge_impl"
    )
    parser.add_argument("--input-grad", action="store_true", help="the input requires grad (backward computes dx)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="wall time, or the process's CPU time")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=704)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--segments", type=int, nargs="+", default=[64, 256], help="segment lengths T")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[torch.get_num_threads()], help="intra-op thread counts (CPU)"
    )
    args = parser.parse_args()
    if min(args.threads) < 1:
        parser.error(f"--threads: expected counts of at least 1, got {args.threads}")
    return args


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def lory_layers(args: argparse.Namespace, model: ModelConfig) -> dict[tuple[str, int, int], LoryFFN]:
    """A Lory layer per (merge, E, T), initialized like the model's; merge is what moe.merge_impl resolves to."""
    layers = {}
    for impl in args.impl:
        merge = resolve_merge_impl(impl, torch.device(args.device))
        for seg in args.segments:
            for num_experts in args.experts:
                overrides = ["moe.routing=lory", f"moe.num_experts={num_experts}", f"moe.segment_length={seg}"]
                cfg = load_config(None, [*overrides, f"moe.merge_impl={impl}"]).moe
                layers[merge, num_experts, seg] = LoryFFN(model, cfg, LayerFactory()).to(args.device)
                init_parameters(layers[merge, num_experts, seg], model, seed=0)
    return layers


def interleaved(dense, layers: dict, x: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict]:
    """Per round and thread count the dense step, then each Lory layer's: dense times and Lory / dense ratios.

    A load change on a shared machine then moves a round's dense and Lory times together, and the
    median of the per-round ratios discards the rounds it hit unevenly. Keys: threads, and (threads, merge, E, T)."""
    dense_s = {threads: [] for threads in args.threads}
    ratios = {(threads, *key): [] for threads in args.threads for key in layers}
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            dense_s[threads].append(timed(fwd_bwd(dense, x), args.repeats, CLOCKS[args.clock]))
            for key, layer in layers.items():
                spent = timed(fwd_bwd(layer, x), args.repeats, CLOCKS[args.clock])
                ratios[(threads, *key)].append(spent / dense_s[threads][-1])
    return dense_s, ratios


def main() -> None:
    """Print the markdown table."""
    args = parse_args()
    dim, hidden, seq = args.dim, args.hidden, args.seq_len
    model = ModelConfig(d_model=dim, num_heads=4, seq_len=seq, vocab_size=64, ffn_hidden_size=hidden)
    x = torch.randn(seq, args.tokens // seq, dim, device=args.device, requires_grad=args.input_grad)
    dense = SwiGLU(dim, hidden, LayerFactory()).to(args.device)
    init_parameters(dense, model, seed=0)
    layers = lory_layers(args, model)
    dense_s, ratios = interleaved(dense, layers, x, args)
    dense_tps = {threads: args.tokens / statistics.median(times) for threads, times in dense_s.items()}
    m_dense = peak_bytes(dense, x)
    print(f"machine: {describe_device(args.device)}; torch {torch.__version__}")
    print(f"d_model {dim}, F {hidden}, {args.tokens} tokens in sequences of {seq}, fp32, input grad {args.input_grad}")
    clock = "wall time" if args.clock == "wall" else "process CPU time (all threads; tokens/s per CPU second)"
    print(f"{args.rounds} round(s) of: dense, then each Lory layer; each the best of {args.repeats} fwd+bwd by {clock}")
    for threads, tps in dense_tps.items():
        print(f"dense SwiGLU, {threads} threads: {tps:,.0f} tokens/s (median)")
    print(f"dense SwiGLU memory: {m_dense / 2**20:.1f} MiB\n")
    print_table(layers, ratios, x, dense_tps, m_dense)


def print_table(layers: dict, ratios: dict, x: torch.Tensor, dense_tps: dict, m_dense: int) -> None:
    """A row per (threads, merge, E, T): the median Lory / dense time ratio over the rounds, its range, the memory."""
    print("| threads | merge | E | T | merge FLOPs / FFN (E/T) | Lory tokens/s | time Lory / dense (median) | range "
          "| memory MiB | memory Lory / dense |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    memory = {key: peak_bytes(layer, x) for key, layer in layers.items()}
    for (threads, merge, num_experts, seg), rounds in ratios.items():
        ratio, m_lory = statistics.median(rounds), memory[merge, num_experts, seg]
        spread, tps = f"{min(rounds):.2f}–{max(rounds):.2f}", dense_tps[threads] / ratio
        print(
            f"| {threads} | {merge} | {num_experts} | {seg} | {num_experts / seg:.3f} | {tps:,.0f} "
            f"| {ratio:.2f} | {spread} | {m_lory / 2**20:.1f} | {m_lory / m_dense:.2f} |"
        )


if __name__ == "__main__":
    main()
