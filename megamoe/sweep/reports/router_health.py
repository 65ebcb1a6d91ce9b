"""The router-health report: gradient norms, routing sharpness and GRU saturation over training.

Reads <run_dir>/router_health.jsonl of every run that logged it (logging.router_health=true;
megamoe.train.router_probe) and tabulates the runs of the lowest seed present at step 1, about a
third of the way and the last step.
"""

from __future__ import annotations

from pathlib import Path

from megamoe.sweep.spec import Run, Sweep
from megamoe.train.metrics import ROUTER_HEALTH_FILE, read_metrics

COLUMNS = (
    "grad/router", "grad/proj", "grad/gru", "grad/all", "logit_std", "entropy", "top1", "h_sat", "h_spread",
    "update_gate",
)  # fmt: skip
"""Table columns: gradient groups as logged; per-layer statistics (L<i>/<name>) as their mean over layers."""
WINDOW = 5
"""A step's figure is the mean over the WINDOW steps ending there (records are one per step)."""

EXPLAIN = """\
Seed {seed} of each run that logged `logging.router_health`. A step's figure is the mean over the
{window} steps ending there, and per-layer figures are means over the MoE layers. grad/router,
grad/proj, grad/gru and grad/all are pre-clip gradient norms of the routers, RMoE's projectors, the
shared GRU and the whole model (what is clipped). logit_std is the spread of the router logits
across experts; entropy is the routing distribution's (nats; ln E is uniform); top1 is the mean
top-1 routing probability. h_sat is the share of GRU state entries with |h| > 0.9, h_spread the std
of the state over tokens, and update_gate the GRU's mean update gate (1 = keep the old state). A
dash marks a figure the run does not have.
"""


def at_steps(max_steps: int) -> list[int]:
    """The table's steps: 1, about max_steps / 3, and max_steps."""
    return sorted({1, max(1, round(max_steps / 3)), max_steps})


def cell(records: list[dict], key: str) -> str:
    """Mean of a key (a per-layer key averaged over layers) over records; '—' when absent."""
    values = [v for r in records for k, v in r.items() if k == key or (k.startswith("L") and k.endswith("/" + key))]
    return f"{sum(values) / len(values):.3g}" if values else "—"


def run_lines(run: Run) -> list[str]:
    """The table rows of one run (its name on the first)."""
    records = read_metrics(run.run_dir, ROUTER_HEALTH_FILE)  # truncated on resume: one record per step
    lines, label = [], run.name
    for step in at_steps(run.cfg.train.max_steps):
        chunk = [r for r in records if step - WINDOW < r["step"] <= step]
        if any(r["step"] == step for r in chunk):  # an unfinished run has no row past its last step
            lines.append(f"| {label} | {step} | " + " | ".join(cell(chunk, key) for key in COLUMNS) + " |")
            label = ""
    return lines


def report(sweep: Sweep, rows: list[dict], out_dir: Path) -> str:
    """The router-health section: one row per run of the lowest seed and table step."""
    head = "## Router health over training\n\n"
    logged = [run for run in sweep.runs if (run.run_dir / ROUTER_HEALTH_FILE).is_file()]
    if not logged:
        return head + f"No run logged router health (`logging.router_health=true` writes {ROUTER_HEALTH_FILE}).\n"
    seed = min(run.seed for run in logged)
    table = ["| run | step | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for run in logged:
        if run.seed == seed:
            table += run_lines(run)
    return head + EXPLAIN.format(seed=seed, window=WINDOW) + "\n" + "\n".join(table) + "\n"
