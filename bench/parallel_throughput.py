"""Training tokens/s of the default model at tp1/tp2 × dp1/dp2 on this machine, as ratios in one run.

Usage: python bench/parallel_throughput.py [--steps N] [--data-cache DIR]
Every layout trains the same global batch (16 × 256 tokens) through `megamoe train` (torchrun +
gloo for more than one rank); tokens/s is the mean of the logged windows after the first (warm-up).
All layouts share the machine's cores: OMP threads per rank = cores / ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megamoe.utils.host import describe_cpu

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"tp1-dp1": (1, 1), "tp2-dp1": (2, 1), "tp1-dp2": (1, 2), "tp2-dp2": (2, 2)}


def run_layout(tp: int, dp: int, steps: int, cache: str, run_dir: Path) -> float:
    """Train `steps` steps at tp × dp and return the measured tokens/s."""
    world = tp * dp
    cores = os.cpu_count() or 1
    args = ["train", f"train.max_steps={steps}", f"logging.log_interval={max(steps // 3, 1)}", "train.eval_interval=0",
            "train.checkpoint_interval=0", "logging.wandb.mode=disabled", "logging.progress=false",
            f"data.cache_dir={cache}", f"train.run_dir={run_dir}", f"parallel.tensor_parallel={tp}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // world, 1)), "PYTHONPATH": str(REPO)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    launch = [sys.executable, "-m", "megamoe"]
    if world > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            "-m",
            "megamoe",
        ]
    subprocess.run([*launch, *args], check=True, env=env, cwd=REPO, capture_output=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]
    return sum(windows) / len(windows)


def main() -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--data-cache", default=str(REPO / ".cache" / "megamoe"))
    args = parser.parse_args()
    print(f"machine: {describe_cpu()}; torch {torch.__version__}, gloo")
    print("| layout | ranks | tokens/s | ratio to tp1-dp1 |\n|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, (tp, dp) in LAYOUTS.items():
            tps = run_layout(tp, dp, args.steps, args.data_cache, Path(tmp) / name)
            base = base or tps
            print(f"| {name} | {tp * dp} | {tps:,.0f} | {tps / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
