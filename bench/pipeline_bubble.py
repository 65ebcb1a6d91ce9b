"""Measured pipeline bubble of GPipe, 1F1B and interleaved 1F1B against the ideal, on CPU/gloo.

Usage: python -m bench.pipeline_bubble [--p 2 4] [--m 4 8 16] [--steps N] [--smoke]
Each p is one torchrun world (bench/pipeline_worker.py) that runs every schedule × m on the same
model. Per rank and step: bubble = 1 − busy / wall, busy = time inside the stage's forward,
backward and loss (not in sends, receives or the schedule's bookkeeping), wall = the whole
schedule step. The table gives the median over the timed steps of the mean over ranks. Ideal,
with equal stages and free communication (Narayanan et al. 2021, §2.2): (p−1)/(m+p−1) for GPipe
and 1F1B, (p−1)/(v·m+p−1) for interleaved 1F1B with v chunks per rank. Ranks run 1 OMP thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megamoe.utils.host import describe_cpu

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
SMOKE = ["--p", "2", "--m", "2", "--steps", "1", "--warmup", "1", "--d-model", "32", "--layers", "4",
         "--heads", "2", "--seq", "16", "--vocab", "64"]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """Command-line arguments (the worker gets them as JSON in PIPELINE_BUBBLE_ARGS)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--m", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--v", type=int, default=2, help="virtual stages per rank (interleaved)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--mb", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, p = 2, m = 2, one timed step")
    return ap


def ideal(p: int, m: int, schedule: str, v: int) -> float:
    """Bubble fraction of the step with equal stages and free communication."""
    chunks = v if schedule == "interleaved_1f1b" else 1
    return (p - 1) / (chunks * m + p - 1)


def single_process_microbatch(args: argparse.Namespace, reps: int) -> float:
    """Median seconds of one micro-batch's forward+backward in this process (all cores)."""
    from bench.pipeline_worker import model_overrides
    from megamoe.config import load_config
    from megamoe.model import build_model

    cfg = load_config(None, model_overrides(args))
    model = build_model(cfg.model, 0, moe=cfg.moe).train()
    tokens = torch.randint(0, cfg.model.vocab_size, (args.mb, cfg.model.seq_len + 1))
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def launch(p: int, args: argparse.Namespace, out: Path) -> None:
    """One torchrun world of p ranks running every schedule × m."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // p, 1)), "PYTHONPATH": str(REPO),
           "PIPELINE_BUBBLE_ARGS": json.dumps({**vars(args), "out": str(out)})}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
           "-m", "bench.pipeline_worker"]  # fmt: skip
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"pipeline_worker p={p} failed:\n{res.stderr[-3000:]}")


def summarize(point: dict) -> dict:
    """Medians over steps of the mean bubble, stage imbalance, CPU share and step wall."""
    steps = list(zip(*point["ranks"]))  # per step: one (busy, cpu, wall) per rank
    bubble = [statistics.mean(1 - b / w for b, _, w in ranks) for ranks in steps]
    imbalance = [max(b for b, _, _ in r) / statistics.mean(b for b, _, _ in r) for r in steps]
    share = [sum(c for _, c, _ in r) / sum(b for b, _, _ in r) for r in steps]
    wall = [max(w for _, _, w in r) for r in steps]
    return {k: statistics.median(v) for k, v in
            {"bubble": bubble, "imbalance": imbalance, "share": share, "wall": wall}.items()}  # fmt: skip


def main() -> None:
    """Print the machine, the single-process reference and the table."""
    args = parser().parse_args()
    if args.smoke:
        args = parser().parse_args([*SMOKE, "--smoke"])
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    micro = single_process_microbatch(args, reps=1 if args.smoke else 5)
    print(f"machine: {describe_cpu()}; torch {torch.__version__}, gloo; load {os.getloadavg()}")
    print(f"model: d {args.d_model}, {args.layers} blocks, seq {args.seq}, vocab {args.vocab}, micro-batch {args.mb}")
    print(f"single process ({cores} threads): {micro * 1e3:.1f} ms per micro-batch forward+backward\n")
    print(
        "| p | schedule | m | ideal bubble | measured bubble | measured / ideal | stage imbalance | CPU share "
        "| step s | single-process step s | step / single |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.p:
            out = Path(tmp) / f"p{p}.jsonl"
            launch(p, args, out)
            for line in out.read_text().splitlines():
                point = json.loads(line)
                s, want = summarize(point), ideal(p, point["m"], point["schedule"], args.v)
                single = point["m"] * micro
                print(f"| {p} | {point['schedule']} | {point['m']} | {want:.3f} | {s['bubble']:.3f} | "
                      f"{s['bubble'] / want:.2f} | {s['imbalance']:.2f} | {s['share']:.2f} | {s['wall']:.2f} | "
                      f"{single:.2f} | {s['wall'] / single:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
