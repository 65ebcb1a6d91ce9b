"""Sweep throughput on a small CPU machine: one run on all cores against `--parallel N` runs side by side.

Usage: python -m bench.sweep_parallel [--sweep configs/sweeps/crossover.yaml] [--variants dense lory_random]
                                      [--steps 150] [--parallel 2]
Each variant of the sweep file trains `--steps` steps with its first run's arguments (no evaluation or checkpoint
before the end), first alone with OMP_NUM_THREADS = all cores, then as `--parallel` runs (seeds 1..N) at once
with cores / N threads each, as `megamoe sweep --parallel N` starts them. Per mode: the wall time from the first
start to the last exit (start-up and the final evaluation included) and the steps per second it amounts to, and
the median logged tokens/s summed over the runs. Each variant's data is prepared first, untimed
(`megamoe data prepare`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megamoe.sweep.spec import Sweep, load_sweep
from megamoe.utils.host import describe_cpu

UNTIMED = ["train.eval_interval=1000000", "train.checkpoint_interval=1000000", "train.checkpoint_steps=[]"]
MEGAMOE = [sys.executable, "-m", "megamoe"]


def variant_args(sweep: Sweep, variant: str) -> list[str]:
    """`megamoe train` arguments of the variant's first run in the sweep (its trunk in a budget sweep)."""
    runs = [r for r in sweep.runs if r.variant == variant and r.branch is None]
    if not runs:
        raise SystemExit(
            f"--variants: no variant {variant!r} in the sweep (it has {sorted({r.variant for r in sweep.runs})})"
        )
    return runs[0].args


def train_cmd(args: list[str], steps: int, seed: int, run_dir: Path) -> list[str]:
    """`megamoe train` for `steps` steps of a run with these arguments, as seed `seed`, into run_dir."""
    extra = [f"train.max_steps={steps}", f"train.seed={seed}", f"train.run_dir={run_dir}", f"train.name={run_dir.name}"]
    return [*MEGAMOE, "train", *args, *UNTIMED, *extra]


def run_together(cmds: list[list[str]], logs: list[Path], threads: int) -> float:
    """Wall seconds from starting every command to the last one's exit (each at `threads` threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(open(log, "w")) for log in logs]
        start = time.perf_counter()
        procs = [subprocess.Popen(c, env=env, stdout=o, stderr=subprocess.STDOUT) for c, o in zip(cmds, outs)]
        for proc, log in zip(procs, logs):
            if proc.wait():
                raise SystemExit(f"a run failed ({proc.returncode}); its log: {log}")
    return time.perf_counter() - start


def median_tokens_per_s(run_dir: Path) -> float:
    """The run's median logged tokens/s, the first log interval (warm-up) left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]
    return statistics.median(rates)


def measure(args: list[str], variant: str, steps: int, parallel: int, work: Path) -> list[str]:
    """Table rows for one variant: alone on all cores, then `parallel` side by side."""
    cores, rows = os.cpu_count() or 1, []
    for n, threads in ((1, cores), (parallel, max(1, cores // parallel))):
        dirs = [work / f"{variant}-{n}x{threads}-seed{s}" for s in range(1, n + 1)]
        cmds = [train_cmd(args, steps, s, d) for s, d in enumerate(dirs, 1)]
        wall = run_together(cmds, [d.with_suffix(".log") for d in dirs], threads)
        rate = sum(median_tokens_per_s(d) for d in dirs)
        rows.append(f"| {variant} | {n} × {threads} threads | {wall:.0f} s | {n * steps / wall:.2f} | {rate:,.0f} |")
    return rows


def main() -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", default="configs/sweeps/crossover.yaml")
    parser.add_argument("--variants", nargs="+", default=["dense", "lory_random"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    sweep = load_sweep(Path(args.sweep))
    print(f"machine: {describe_cpu()}; {args.sweep}, {args.steps} steps a run\n")
    print("| variant | runs × threads | wall | steps/s (all runs) | tokens/s (sum of medians) |\n|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="sweep_parallel_"))  # kept (with the runs' logs) if a run fails
    for variant in args.variants:
        train_args = variant_args(sweep, variant)
        subprocess.run([*MEGAMOE, "data", "prepare", *train_args], check=True, capture_output=True)
        for row in measure(train_args, variant, args.steps, args.parallel, work):
            print(row, flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
