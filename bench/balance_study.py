"""Summarize the load-balancing sweep (configs/sweeps/balance.yaml): balance over training and val perplexity.

Usage: python bench/balance_study.py [SWEEP_OUT] [--plot PNG]
SWEEP_OUT defaults to runs/sweeps/balance. Per variant (mean ± std over the finished seeds):
- val ppl at the last step;
- load_max (tokens of the busiest expert / mean) and load_cv, averaged over the MoE layers and over
  the logged steps of the first and the second half of training;
- dead: the most experts with no token in any logged step, summed over layers.
--plot writes the mean load_cv (over layers and seeds) against the step, one line per variant.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from megamoe.train.run import load_run_config


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl of one run."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def layer_mean(row: dict, name: str) -> float:
    """Mean of moe/L<i>/<name> over the MoE layers of one record."""
    return float(np.mean([v for k, v in row.items() if re.fullmatch(rf"moe/L\d+/{name}", k)]))


def run_stats(run_dir: Path, max_steps: int) -> dict[str, float] | None:
    """The study's numbers for one finished run (None if unfinished)."""
    rows = records(run_dir)
    train = [r for r in rows if "moe/load_cv_max" in r]
    evals = [r for r in rows if "eval/ppl" in r]
    if not evals or evals[-1]["step"] != max_steps:
        return None
    halves = [[r for r in train if r["step"] <= max_steps // 2], [r for r in train if r["step"] > max_steps // 2]]
    out = {"ppl": evals[-1]["eval/ppl"], "dead": max(r["moe/dead"] for r in train)}
    for i, half in enumerate(halves, 1):
        out[f"load_max_h{i}"] = float(np.mean([layer_mean(r, "load_max") for r in half]))
        out[f"load_cv_h{i}"] = float(np.mean([layer_mean(r, "load_cv") for r in half]))
    out["cv_curve"] = [(r["step"], layer_mean(r, "load_cv")) for r in train]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=Path("runs/sweeps/balance"))
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    groups: dict[str, list[dict]] = {}
    for run_dir in sorted(d for d in args.out.iterdir() if (d / "metrics.jsonl").is_file()):
        stats = run_stats(run_dir, load_run_config(str(run_dir), []).train.max_steps)
        if stats is not None:
            groups.setdefault(run_dir.name.rsplit("-seed", 1)[0], []).append(stats)
    cols = ["ppl", "load_max_h1", "load_max_h2", "load_cv_h1", "load_cv_h2"]
    print("| variant | seeds | val ppl | load max/mean, 1st half | 2nd half | load CV, 1st half | 2nd half | dead |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in groups.items():
        cells = [f"{np.mean([r[c] for r in runs]):.3f} ± {np.std([r[c] for r in runs]):.3f}" for c in cols]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {max(r['dead'] for r in runs):.0f} |")
    if args.plot:
        plot(groups, args.plot)


def plot(groups: dict[str, list[dict]], path: Path) -> None:
    """Mean load CV against the step per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, runs in groups.items():
        n = min(len(r["cv_curve"]) for r in runs)
        steps = [s for s, _ in runs[0]["cv_curve"][:n]]
        ax.plot(steps, np.mean([[v for _, v in r["cv_curve"][:n]] for r in runs], 0), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("load CV (mean over layers and seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
