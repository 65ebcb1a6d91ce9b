"""The load-balancing report: balance over training and validation perplexity per variant.

Per group of seeds (mean ± sample std over the finished runs):
- val ppl at the final step;
- load max/mean (tokens of the busiest expert over the mean) and load CV, each averaged over the
  MoE layers and over the logged steps of the first and of the second half of training;
- dead: the most experts that received no token in any logged step, summed over layers.
It also plots the mean load CV (over layers and seeds) against the step, one line per group.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from megamoe.sweep.collect import group_of, run_records
from megamoe.sweep.reports import save_png
from megamoe.sweep.spec import Run, Sweep

COLUMNS = ("ppl", "load_max_h1", "load_max_h2", "load_cv_h1", "load_cv_h2")
"""The mean ± std cells of a row, in table order."""
PLOT = "balance_load_cv.png"


def layer_mean(row: dict, name: str) -> float:
    """Mean of moe/L<i>/<name> over the MoE layers of one record."""
    return float(np.mean([v for k, v in row.items() if re.fullmatch(rf"moe/L\d+/{name}", k)]))


def run_stats(run: Run) -> dict | None:
    """The report's numbers for one run (None unless it has routing metrics and its final evaluation).

    A budget branch's records start with its trunk's up to the branch point, as its training did.
    """
    rows, max_steps = run_records(run), run.cfg.train.max_steps
    train = [r for r in rows if "moe/load_cv_max" in r]
    evals = [r for r in rows if "eval/ppl" in r]
    if not train or not evals or evals[-1]["step"] != max_steps:
        return None
    halves = ([r for r in train if r["step"] <= max_steps // 2], [r for r in train if r["step"] > max_steps // 2])
    out = {"ppl": evals[-1]["eval/ppl"], "dead": max(r["moe/dead"] for r in train)}
    for i, half in enumerate(halves, 1):
        out[f"load_max_h{i}"] = float(np.mean([layer_mean(r, "load_max") for r in half])) if half else float("nan")
        out[f"load_cv_h{i}"] = float(np.mean([layer_mean(r, "load_cv") for r in half])) if half else float("nan")
    out["cv_curve"] = [(r["step"], layer_mean(r, "load_cv")) for r in train]
    return out


def _cell(values: list[float]) -> str:
    """'mean ± sample std' ('±' omitted for one seed)."""
    mean = float(np.mean(values))
    return f"{mean:.3f} ± {float(np.std(values, ddof=1)):.3f}" if len(values) > 1 else f"{mean:.3f}"


def report(sweep: Sweep, rows: list[dict], out_dir: Path) -> str:
    """The balance table and the load-CV plot (balance_load_cv.png)."""
    groups: dict[str, list[dict]] = {}
    for run in sweep.runs:
        stats = run_stats(run) if (run.run_dir / "metrics.jsonl").is_file() else None
        if stats is not None:
            groups.setdefault(run.group or group_of(run.name), []).append(stats)
    lines = [
        "## Load balance over training",
        "",
        "Mean ± sample std over seeds. Load max/mean and load CV are averaged over the MoE layers and over",
        "the logged steps of each half of training; dead is the most experts with no token in any logged",
        "step, summed over layers.",
        "",
        "| variant | seeds | val ppl | load max/mean, 1st half | 2nd half | load CV, 1st half | 2nd half | dead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in groups.items():
        cells = " | ".join(_cell([r[c] for r in runs]) for c in COLUMNS)
        lines.append(f"| {name} | {len(runs)} | {cells} | {max(r['dead'] for r in runs):.0f} |")
    if not groups:
        return "\n".join([*lines[:2], "No finished run logged routing metrics (moe/load_cv_*).", ""])
    plot(groups, out_dir / PLOT)
    return "\n".join([*lines, "", f"![load CV over training]({PLOT})", ""])


def plot(groups: dict[str, list[dict]], path: Path) -> None:
    """Mean load CV against the step per group."""
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
    save_png(fig, path)
