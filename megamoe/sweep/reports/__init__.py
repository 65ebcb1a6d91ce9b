"""Study reports that `megamoe sweep --collect` adds to results.md when the sweep file names them.

A sweep file's `reports: [NAME, ...]` picks them. Each is a function `report(sweep, rows, out_dir)
-> str`: rows are collect's per-run rows, out_dir the sweep root (for its plots). It returns a
markdown section, which collect writes to `report_<NAME>.md` and appends to results.md.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPORTS = {
    "analyze": ("megamoe.sweep.reports.analyses", ("runs",)),
    "balance": ("megamoe.sweep.reports.balance", ()),
    "crossover": ("megamoe.sweep.reports.crossover", ("baseline", "pairs", "analyze")),
    "group_a2a": ("megamoe.sweep.reports.group_a2a", ("ep", "sequences")),
    "reeval": ("megamoe.sweep.reports.reeval", ("max_sequences", "pairs")),
    "router_health": ("megamoe.sweep.reports.router_health", ()),
}
"""Report name → (module holding its `report` function, imported only when used; its options)."""


def report_function(name: str) -> Callable:
    """The `report` function of a named report."""
    return importlib.import_module(REPORTS[name][0]).report


def run_megamoe(report: str, *args: str) -> None:
    """Run `python -m megamoe ARGS` for a report; its failure is a MegamoeError naming the report and command."""
    cmd = [sys.executable, "-m", "megamoe", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        from megamoe.errors import MegamoeError

        raise MegamoeError(f"{report} report: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def save_png(fig, path: Path) -> None:
    """Save a matplotlib figure to path atomically (a killed collect leaves the old plot), then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    plt.close(fig)
