"""The routing-analyses report: `megamoe analyze` on chosen runs of the sweep, their reports inlined.

Option `runs`: a list of {variant, args: [extra `megamoe analyze` arguments], out: folder name in the
run directory (default "analysis")}. Each analyses the variant's lowest-seed run at its largest budget,
once: a folder that already holds report.md and the final step's recording is reused. The section
inlines each report.md with its headings moved two levels down and its links made relative to the
sweep folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from megamoe.sweep.reports import run_megamoe
from megamoe.sweep.spec import Sweep


def analyse(run_dir: Path, step: int, args: list[str], out: str, report: str = "analyze") -> Path:
    """<run_dir>/<out>/report.md, running `megamoe analyze` when it or the step's recording is missing."""
    folder = run_dir / out
    if not ((folder / "report.md").is_file() and (folder / f"routing_step_{step}.npz").is_file()):
        run_megamoe(report, "analyze", str(run_dir), "--out", str(folder), *args)
    return folder / "report.md"


def inline(report_md: Path, prefix: str) -> list[str]:
    """report.md's lines with headings two levels down and relative links prefixed."""
    text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", report_md.read_text(), flags=re.M)
    text = re.sub(r"\]\((?!https?:|/)([^)]+)\)", rf"]({prefix}/\1)", text)
    return text.splitlines()


def report(sweep: Sweep, rows: list[dict], out_dir: Path, runs: list[dict] | None = None) -> str:
    """`megamoe analyze` of each requested run, inlined."""
    by_name = {run.name: run for run in sweep.runs}
    lines = ["## Routing analyses", ""]
    for entry in runs or []:
        variant, args, out = entry["variant"], [str(a) for a in entry.get("args", [])], entry.get("out", "analysis")
        mine = [r for r in rows if by_name[r["run"]].variant == variant]
        if not mine:
            lines += [f"### {variant}: no finished run yet", ""]
            continue
        top = max(r["step"] for r in mine)
        row = min((r for r in mine if r["step"] == top), key=lambda r: r["seed"])
        run_dir = by_name[row["run"]].run_dir
        lines += [f"### {row['run']}: `megamoe analyze {' '.join(args)}`", ""]
        lines += [*inline(analyse(run_dir, top, args, out), f"{row['run']}/{out}"), ""]
    return "\n".join(lines)
