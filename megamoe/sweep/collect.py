"""`megamoe sweep --collect`: final metrics of every run, means and spreads over seeds, overlaid curves.

Writes <sweep root>/results.csv (one row per finished run), results.md (one row per variant and
grid point, and per budget in a budget sweep: mean ± sample std over seeds of the final validation
loss and perplexity, steps, tokens, and the mean over seeds of each run's median logged tokens/s)
and curves.png (mean eval loss and smoothed train loss against tokens, per group; a branch's curve
starts with its trunk's up to the branch point).
Each row also has the run's `cpu_s` and `wall_s`, summed over its attempts (logs/<run>.attempts.jsonl;
empty where none was recorded), and `attempts`. A branch counts only its own attempts: the steps it
shares with its trunk (up to `branch_step`) are paid once, by the trunk. results.md ends with the
sweep's totals over every recorded attempt, finished runs or not.
A sweep file's `reports` add study reports (megamoe/sweep/reports/): each writes report_<name>.md
and is appended to results.md.
Runs evaluated with `megamoe eval RUN --tasks ...` at their final step (eval/lm_eval_step_<N>.json)
add one column per task and metric, `lm_eval/<task>/<metric>`, to both tables.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path

import numpy as np

from megamoe.sweep.archive import is_done
from megamoe.sweep.attempts import attempts_file, read_attempts
from megamoe.sweep.spec import Run, Sweep
from megamoe.train.metrics import read_metrics
from megamoe.utils.fs import atomic_write_text


def group_of(run_name: str) -> str:
    """The run name without its seed suffix."""
    return run_name.rsplit("-seed", 1)[0]


def _group(run: Run) -> str:
    """The runs that differ only in seed share it."""
    return run.group or group_of(run.name)


def cost(sweep: Sweep, run: Run) -> dict[str, float | int | None]:
    """cpu_s and wall_s summed over the run's recorded attempts (None without a record), and their count."""
    found = read_attempts(attempts_file(sweep.root / "logs", run.name))
    total = {key: round(sum(a[key] for a in found), 3) if found else None for key in ("cpu_s", "wall_s")}
    return {**total, "attempts": len(found)}


def run_rows(sweep: Sweep) -> list[dict]:
    """Final metrics of the finished runs."""
    rows = []
    for run in sweep.runs:
        path = run.run_dir / "summary.json"
        if not is_done(run.run_dir, run.cfg.train.max_steps):  # none yet, or one a stop (SIGTERM) wrote early
            continue
        summary = json.loads(path.read_text())
        records = read_metrics(run.run_dir)
        final = _final_eval(summary, records)
        if final is None:
            continue
        speeds = [r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r]
        rows.append({
            "run": run.name, "group": _group(run), "seed": run.seed, "step": summary["step"],
            "tokens": summary["tokens"], "eval_loss": final["eval/loss"], "eval_ppl": final["eval/ppl"],
            "tokens_per_s": round(statistics.median(speeds)) if speeds else float("nan"),
            **cost(sweep, run), **({"branch_step": run.branch.step} if run.branch else {}),
            **lm_eval_columns(run.run_dir, summary["step"]),
        })  # fmt: skip
    return rows


def lm_eval_columns(run_dir: Path, step: int) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` of the run's lm-eval record at step (stderrs and counts left out); {} if none."""
    path = run_dir / "eval" / f"lm_eval_step_{step}.json"
    if not path.is_file():
        return {}
    tasks = json.loads(path.read_text()).get("tasks", {})
    skip = ("samples", "num_fewshot", "limit")
    return {
        f"lm_eval/{task}/{metric}": value
        for task, metrics in sorted(tasks.items())
        for metric, value in metrics.items()
        if metric not in skip and not metric.endswith("_stderr") and isinstance(value, int | float)
    }


def _final_eval(summary: dict, records: list[dict]) -> dict | None:
    """The final evaluation: the summary's, else the one logged at the summary's step.

    A run killed after its last checkpoint but before its summary resumes at max_steps with no
    step left to train, and its new summary then holds no evaluation; its metrics still do.
    """
    if "eval/loss" in summary:
        return summary
    logged = [r for r in records if r.get("step") == summary["step"] and "eval/loss" in r]
    return logged[-1] if logged else None


def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std; '±' omitted for one seed)."""
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def group_table(rows: list[dict]) -> list[dict]:
    """One row per group, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    out = []
    for name, members in groups.items():
        out.append({
            "variant": name, "seeds": len(members), "steps": members[0]["step"], "tokens": members[0]["tokens"],
            "val loss": mean_std([m["eval_loss"] for m in members]),
            "val ppl": mean_std([m["eval_ppl"] for m in members]),
            "tokens/s (median)": f"{statistics.fmean(m['tokens_per_s'] for m in members):,.0f}",
        })  # fmt: skip
    columns = _lm_eval_keys(rows)
    for row, members in zip(out, groups.values()):
        for key in columns:
            values = [m[key] for m in members if key in m]
            row[key.removeprefix("lm_eval/")] = mean_std(values) if values else "-"
    return out


def _lm_eval_keys(rows: list[dict]) -> list[str]:
    """The lm-eval columns of any row, in first-seen order."""
    return list(dict.fromkeys(k for row in rows for k in row if k.startswith("lm_eval/")))


def markdown(table: list[dict]) -> str:
    """A markdown table."""
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in table]
    return "\n".join(lines) + "\n"


def curves(sweep: Sweep, path: Path) -> None:
    """Mean eval loss and smoothed train loss against tokens, one line per group (runs with both logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[list, list, list, list]]] = {}
    for run in sweep.runs:
        if not (run.run_dir / "metrics.jsonl").is_file():
            continue
        records = run_records(run)
        tokens_per_step = run.cfg.train.global_batch_size * run.cfg.model.seq_len
        train = [(r["step"] * tokens_per_step, r["train/loss"]) for r in records if "train/loss" in r]
        evals = [(r["step"] * tokens_per_step, r["eval/loss"]) for r in records if "eval/loss" in r]
        if not (train and evals):  # a run that has just started: nothing to draw yet
            continue
        series.setdefault(_group(run), []).append((*zip(*train, strict=True), *zip(*evals, strict=True)))
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in series.items():
        n = min(len(r[0]) for r in runs)
        train_x, train_y = runs[0][0][:n], np.mean([r[1][:n] for r in runs], 0)
        window = max(1, n // 20)
        smooth = np.convolve(train_y, np.ones(window) / window, mode="valid")
        ax_train.plot(train_x[window - 1 :], smooth, label=name)
        m = min(len(r[2]) for r in runs)
        ax_eval.plot(runs[0][2][:m], np.mean([r[3][:m] for r in runs], 0), marker="o", label=name)
    for ax, title in ((ax_train, "train loss (smoothed, mean over seeds)"), (ax_eval, "val loss (mean over seeds)")):
        ax.set_xlabel("tokens")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_records(run: Run) -> list[dict]:
    """The run's logged metrics; a branch's start with its trunk's up to the branch point."""
    own = read_metrics(run.run_dir)
    if run.branch is None or not (run.branch.trunk_dir / "metrics.jsonl").is_file():
        return own
    return [r for r in read_metrics(run.branch.trunk_dir) if r["step"] <= run.branch.step] + own


def totals(sweep: Sweep) -> str:
    """A line on what the sweep's recorded attempts cost, finished runs or not."""
    found = [a for run in sweep.runs for a in read_attempts(attempts_file(sweep.root / "logs", run.name))]
    cpu, wall = sum(a["cpu_s"] for a in found), sum(a["wall_s"] for a in found)
    lost = sum(bool(a.get("lost")) for a in found)
    beats = f" ({lost} of them to their last heartbeat: in flight, or killed with their sweep)" if lost else ""
    return (
        f"Cost: {cpu:,.0f} CPU seconds ({cpu / 3600:.2f} CPU hours) and {wall:,.0f} wall seconds "
        f"over {len(found)} recorded attempts{beats}.\n"
    )


def _reports(sweep: Sweep, rows: list[dict]) -> str:
    """Run the sweep's study reports: each to report_<name>.md; their sections, to append to results.md."""
    from megamoe.sweep.reports import report_function

    sections = []
    for name, options in sweep.reports:
        section = report_function(name)(sweep, rows, sweep.root, **options)
        atomic_write_text(sweep.root / f"report_{name}.md", section)
        sections.append("\n" + section)
    return "".join(sections)


def collect(sweep: Sweep) -> tuple[Path, str]:
    """Write results.csv, results.md and curves.png; returns (root, the markdown table and the cost line)."""
    rows = run_rows(sweep)
    if not rows:
        from megamoe.errors import MegamoeError

        raise MegamoeError(f"--collect: no finished run under {sweep.root}")
    sweep.root.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))  # lm-eval columns: empty where a run has none
    writer = csv.DictWriter(text, fieldnames=fields, restval="", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep.root / "results.csv", text.getvalue())  # a killed collect leaves the old file
    table = markdown(group_table(rows))
    missing = len(sweep.runs) - len(rows)
    note = f"\n{missing} of {len(sweep.runs)} runs not finished.\n" if missing else ""
    cost_line = totals(sweep)
    page = f"# {sweep.name}\n\n{table}{note}\n{cost_line}\n![curves](curves.png)\n" + _reports(sweep, rows)
    atomic_write_text(sweep.root / "results.md", page)
    tmp = sweep.root / ".curves.tmp.png"
    curves(sweep, tmp)
    os.replace(tmp, sweep.root / "curves.png")
    return sweep.root, f"{table}\n{cost_line}"
