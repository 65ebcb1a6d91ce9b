"""Activation memory and step time of train.recompute none / selective / full, as ratios to none in one run.

Usage: python -m bench.recompute [--steps N] [--sizes tiny small] [--smoke]
A step is the forward and backward of one batch (the optimizer's time and memory do not depend on
recompute). For every model the three modes run in turn on the same weights and batch, round after
round, so the machine's load drifts over all of them alike; each figure is the median over rounds.
Step time is given as wall time and as this thread's CPU time: with 1 intra-op thread (the
default) the whole forward and backward runs on it, and its CPU time does not count the time other
processes on a shared machine take from it.

* saved: bytes autograd keeps for backward during the forward (saved_tensors_hooks, distinct
  storages, parameters excluded); deterministic.
* peak: CUDA, the allocator's peak above the step's start. CPU has no allocator statistics: the peak
  resident set size above the step's start, sampled every millisecond by a thread. The script re-runs
  itself with MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed tensors to the OS and the resident
  size follows the live tensors (gradients, allocated in every step, are part of the peak).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time

import torch

from bench.lory_layer import saved_bytes
from megamoe.config import load_config
from megamoe.model import build_model
from megamoe.model.recompute import MODES, set_recompute
from megamoe.utils.host import describe_device

SIZES = {
    "tiny": ["model.d_model=256", "model.num_layers=4", "model.num_heads=4", "model.seq_len=256",
             "train.micro_batch_size=8"],
    "small": ["model.d_model=512", "model.num_layers=8", "model.num_heads=8", "model.seq_len=512",
              "train.micro_batch_size=4"],
    "smoke": ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.seq_len=64",
              "train.micro_batch_size=2"],
}  # fmt: skip
FAMILIES = {
    "dense": [],
    "top-2 8E": ["moe.routing=topk", "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden_size=-1"],
    "Lory 8E T64": ["moe.routing=lory", "moe.num_experts=8", "moe.segment_length=64"],
}
MALLOC = "MALLOC_MMAP_THRESHOLD_"
FIELDS = [("saved", 2**20, 1), ("peak", 2**20, 1), ("cpu", 1e-3, 0), ("seconds", 1e-3, 0)]
"""Table columns: (measure, unit divisor, decimals), each followed by its ratio to none."""


class PeakRSS:
    """Peak resident set size above the start, sampled by a thread while the block runs."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        """Resident bytes of this process now."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(self.interval_s)

    def __enter__(self):
        self.start = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.start)


def step(model, tokens_BL: torch.Tensor) -> tuple[float, float, int]:
    """(wall seconds, this thread's CPU seconds, peak bytes above the start) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    cuda = tokens_BL.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with contextlib.nullcontext() if cuda else PeakRSS() as rss:
        start, cpu = time.perf_counter(), time.thread_time()
        out = model(tokens_BL[:, :-1], tokens_BL[:, 1:])
        (out.loss + out.aux_loss).backward()
        del out
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return seconds, cpu, torch.cuda.max_memory_allocated() - base if cuda else rss.peak


def compare(model, tokens_BL: torch.Tensor, settings: dict, rounds: int) -> dict:
    """Per setting (key → a function that applies it to the model): saved bytes, and the median peak bytes,
    CPU and wall seconds of a step; the settings run in turn, round after round, after a warm-up round."""
    runs: dict = {key: [] for key in settings}
    saved = {}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for key, apply in settings.items():
            apply()
            if r == 0:
                saved[key] = saved_bytes(lambda: model(tokens_BL[:, :-1], tokens_BL[:, 1:]), model)
            result = step(model, tokens_BL)
            if r > 0:
                runs[key].append(result)
    return {
        key: {"saved": saved[key], "peak": statistics.median(p for _, _, p in runs[key]),
              "seconds": statistics.median(s for s, _, _ in runs[key]),
              "cpu": statistics.median(c for _, c, _ in runs[key])}
        for key in settings
    }  # fmt: skip


def model_and_batch(overrides: list[str], device: torch.device):
    """The configured model (in training mode, past any dense warm-up) and one micro-batch of token ids."""
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, 0, moe=cfg.moe).to(device).train()
    model.set_dense_phase(False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1), generator=gen)
    return model, tokens.to(device)


def measure(overrides: list[str], rounds: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Saved bytes, median peak bytes and median seconds of every recompute mode on one model."""
    model, tokens = model_and_batch(["model.vocab_size=4096", *overrides], device)
    return compare(model, tokens, {mode: lambda mode=mode: set_recompute(model, mode) for mode in MODES}, rounds)


def header(first: str, baseline: str, device: torch.device) -> None:
    """Print the machine and the table's head (ratios to `baseline`)."""
    memory = "peak allocated" if device.type == "cuda" else "peak RSS"
    print(f"machine: {describe_device(device)}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {device.type}, fp32; load {os.getloadavg()}\n")  # fmt: skip
    print(f"| model | {first} | saved MiB | saved / {baseline} | {memory} MiB | peak / {baseline} | step CPU ms "
          f"| CPU / {baseline} | step wall ms | wall / {baseline} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")


def cells(row: dict, base: dict) -> str:
    """A result's table cells, each figure followed by its ratio to the baseline's."""
    return " | ".join(f"{row[k] / s:,.{d}f} | {row[k] / base[k]:.2f}" for k, s, d in FIELDS)


def expert_width(overrides: list[str]) -> list[str]:
    """Top-2 experts of half the dense FFN width (the dense model's active size)."""
    if "moe.expert_hidden_size=-1" not in overrides:
        return overrides
    width = load_config(None, [o for o in overrides if o.startswith("model.")]).model.ffn_hidden // 2
    return [o for o in overrides if o != "moe.expert_hidden_size=-1"] + [f"moe.expert_hidden_size={width}"]


def parse_args(doc: str, sizes: dict, default_sizes: list[str], add=None) -> tuple[argparse.Namespace, list[str], int]:
    """Re-run under MALLOC_MMAP_THRESHOLD_ (CPU: the resident size then follows the live tensors), parse
    --sizes/--steps/--threads/--smoke (and what `add` adds), set the threads; (args, sizes, timed rounds)."""
    if sys.platform == "linux" and MALLOC not in os.environ and not torch.cuda.is_available():
        os.execve(sys.executable, sys.orig_argv, {**os.environ, MALLOC: "65536"})
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=default_sizes, choices=list(sizes))
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (each runs every setting once)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: CPU time is all on this thread)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one timed round")
    if add:
        add(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, *((["smoke"], 1) if args.smoke else (args.sizes, args.steps))


def main() -> None:
    """Print the machine and one table row per (size, family, mode)."""
    _, sizes, rounds = parse_args(__doc__, SIZES, ["tiny", "small"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header("recompute", "none", device)
    for size in sizes:
        for family, extra in FAMILIES.items():
            res = measure(expert_width([*SIZES[size], *extra]), rounds, device)
            for mode, r in res.items():
                print(f"| {size} {family} | {mode} | {cells(r, res['none'])} |", flush=True)


if __name__ == "__main__":
    main()
