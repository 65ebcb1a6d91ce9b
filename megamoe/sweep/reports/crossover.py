"""The budget crossover report: each variant against a baseline at every budget, in tokens and in FLOPs.

Options (a sweep file's `reports: [{crossover: {...}}]`):
  baseline: the variant every other is compared with (default: the sweep's first variant);
  pairs: [[a, b], ...] variants compared seed by seed (a − b) at every budget both have finished;
  analyze: [variant, ...] Lory variants whose per-domain routing weights are compared (lory_domains.py).
A budget's FLOPs are the run's training FLOPs per token (megamoe.model.params.flops_per_token,
megatron-core's counting) times its tokens. "Ahead" and "behind" need the difference of the means to
exceed 2 standard errors, √(s_a²/n_a + s_b²/n_b); anything smaller is "within noise".
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from megamoe.sweep.reports import save_png
from megamoe.sweep.spec import Run, Sweep

PLOT = "crossover.png"
Z = 2.0
"""Standard errors a difference must exceed to count as ahead or behind."""
FLOPS_SLACK = 0.01
"""at_flops: relative FLOPs beyond the baseline's budgets still read as its end budget."""


def run_flops(run: Run) -> float:
    """Training FLOPs per token of a run, from the config it saved (its real vocabulary)."""
    from megamoe.model.params import flops_per_token, meta_counts
    from megamoe.train.run import load_run_config

    cfg = load_run_config(str(run.run_dir), [])
    return flops_per_token(cfg.model, meta_counts(cfg.model, None, cfg.moe), cfg.moe)


def points(sweep: Sweep, rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """variant → steps → its finished runs' rows, with `flops`, `cpu_total_s` and `wall_total_s` added."""
    runs = {run.name: run for run in sweep.runs}
    by_name = {row["run"]: row for row in rows}
    flops: dict[str, float] = {}
    out: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        run = runs[row["run"]]
        flops.setdefault(run.variant, run_flops(run))
        trunk = by_name.get(run.branch.trunk) if run.branch else None
        part = run.branch.step / trunk["step"] if trunk else 0.0
        extra = {"flops": flops[run.variant] * row["tokens"]}
        for key in ("cpu_s", "wall_s"):
            extra[key.replace("_s", "_total_s")] = (row[key] or 0) + ((trunk[key] or 0) * part if trunk else 0.0)
        out.setdefault(run.variant, {}).setdefault(row["step"], []).append({**row, **extra})
    return out


def _stats(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), n)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _cell(stats: tuple[float, float, int], digits: int) -> str:
    """'mean ± std', or the mean alone for one seed."""
    mean, std, n = stats
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def verdict(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """(mean a − mean b, its standard error, 'ahead' | 'behind' | 'within noise'); lower is better."""
    (ma, sa, na), (mb, sb, nb) = _stats(a), _stats(b)
    diff, se = ma - mb, math.sqrt(sa**2 / na + sb**2 / nb)
    if na < 2 or nb < 2:
        return diff, float("nan"), "one seed"
    return diff, se, "ahead" if diff < -Z * se else "behind" if diff > Z * se else "within noise"


def at_flops(base: dict[int, list[dict]], flops: float) -> float:
    """The baseline's mean loss at these FLOPs: linear in log FLOPs between its budgets (nan outside them).

    FLOPs within FLOPS_SLACK of the baseline's first or last budget take that budget's loss: equal active
    compute still differs by a router's few FLOPs, which would otherwise leave the largest budget blank.
    """
    xs = sorted(
        (statistics.fmean(r["flops"] for r in rs), statistics.fmean(r["eval_loss"] for r in rs)) for rs in base.values()
    )
    logs, losses = np.log([x for x, _ in xs]), [y for _, y in xs]
    slack = math.log1p(FLOPS_SLACK)
    inside = logs[0] - slack <= math.log(flops) <= logs[-1] + slack
    return float(np.interp(math.log(flops), logs, losses)) if inside else float("nan")


def equal_flops_delta(data: dict[str, dict[int, list[dict]]], variant: str, baseline: str, steps: int) -> str:
    """Δ mean loss at equal FLOPs: the variant at this budget against the baseline's curve at its FLOPs.

    Where those FLOPs lie beyond the baseline's budgets (a router's or a merge's extra FLOPs at the
    largest budget), the variant's own curve at the baseline's FLOPs of this budget instead, marked †;
    both interpolate (at_flops), neither extrapolates, and '—' is left where neither can.
    """
    mine, base = data[variant][steps], data[baseline][steps]
    loss, flops = (statistics.fmean(r[k] for r in mine) for k in ("eval_loss", "flops"))
    if not math.isnan(diff := loss - at_flops(data[baseline], flops)):
        return f"{diff:+.3f}"
    base_loss, base_flops = (statistics.fmean(r[k] for r in base) for k in ("eval_loss", "flops"))
    diff = at_flops(data[variant], base_flops) - base_loss
    return "—" if math.isnan(diff) else f"{diff:+.3f} †"


def budget_table(data: dict[str, dict[int, list[dict]]], baseline: str) -> list[str]:
    """One row per (budget, variant)."""
    lines = [
        f"| steps | tokens | variant | seeds | FLOPs | val loss | val ppl | Δ loss vs {baseline} (± SE) | "
        f"vs {baseline} | Δ loss at equal FLOPs | CPU h | wall h |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for steps in sorted({s for budgets in data.values() for s in budgets}):
        for variant, budgets in data.items():
            rs = budgets.get(steps)
            if not rs:
                continue
            loss, ppl = _stats([r["eval_loss"] for r in rs]), _stats([r["eval_ppl"] for r in rs])
            flops = statistics.fmean(r["flops"] for r in rs)
            cells = ["—", "—", "—"]
            if variant != baseline and steps in data.get(baseline, {}):
                diff, se, word = verdict([r["eval_loss"] for r in rs], [r["eval_loss"] for r in data[baseline][steps]])
                delta = f"{diff:+.3f}" if math.isnan(se) else f"{diff:+.3f} ± {se:.3f}"
                cells = [delta, word, equal_flops_delta(data, variant, baseline, steps)]
            hours = [statistics.fmean(r[k] for r in rs) / 3600 for k in ("cpu_total_s", "wall_total_s")]
            lines.append(
                f"| {steps} | {rs[0]['tokens']:,} | {variant} | {len(rs)} | {flops:.3g} | {_cell(loss, 3)} "
                f"| {_cell(ppl, 1)} | " + " | ".join(cells) + f" | {hours[0]:.2f} | {hours[1]:.2f} |"
            )
    return lines


def crossover_lines(data: dict[str, dict[int, list[dict]]], baseline: str) -> list[str]:
    """Where each variant overtakes the baseline at equal tokens: the smallest budget from which it stays ahead."""
    lines = []
    base = data.get(baseline, {})
    for variant, budgets in data.items():
        if variant == baseline:
            continue
        shared = sorted(s for s in budgets if s in base)
        found = {s: verdict([r["eval_loss"] for r in budgets[s]], [r["eval_loss"] for r in base[s]]) for s in shared}
        ahead = [s for i, s in enumerate(shared) if all(found[t][2] == "ahead" for t in shared[i:])]
        each = ", ".join(f"{budgets[s][0]['tokens']:,} tokens {found[s][0]:+.3f} ({found[s][2]})" for s in shared)
        if ahead:
            text = f"ahead from {budgets[ahead[0]][0]['tokens']:,} tokens ({ahead[0]} steps) on; {each}"
        elif any(found[s][2] == "one seed" for s in shared):
            text = f"no verdict while a budget has one seed; {each}"
        elif shared:
            text = f"not ahead through the largest budget; {each}"
        else:
            text = f"no budget shared with {baseline} yet"
        lines.append(f"- **{variant}**: {text}.")
    return lines


def pair_table(data: dict[str, dict[int, list[dict]]], pairs: list[list[str]]) -> list[str]:
    """a − b seed by seed at every budget both have finished: each seed's difference, their mean, sample std and SE.

    The SE of a paired mean is the differences' sample std / √n ('—' with one seed)."""
    lines = ["| a − b | steps | tokens | seeds | a − b per seed | mean | sample std | SE |", "|---" * 8 + "|"]
    for a, b in pairs:
        rows = [_pair_row(a, b, steps, data) for steps in sorted(set(data.get(a, {})) & set(data.get(b, {})))]
        rows = [row for row in rows if row]
        lines += rows or [f"| {a} − {b} | — | — | — | no seed finished for both yet | | | |"]
    return lines


def _pair_row(a: str, b: str, steps: int, data: dict[str, dict[int, list[dict]]]) -> str:
    """One budget's row of pair_table ('' when no seed has finished both)."""
    la = {r["seed"]: r["eval_loss"] for r in data[a][steps]}
    lb = {r["seed"]: r["eval_loss"] for r in data[b][steps]}
    seeds = sorted(set(la) & set(lb))
    if not seeds:
        return ""
    diffs = [la[s] - lb[s] for s in seeds]
    mean, std, n = _stats(diffs)
    se = f"{std / math.sqrt(n):.3f}" if n > 1 else "—"
    each = ", ".join(f"{d:+.3f}" for d in diffs)
    seed_list = ", ".join(map(str, seeds))
    tokens = data[a][steps][0]["tokens"]
    return f"| {a} − {b} | {steps} | {tokens:,} | {seed_list} | {each} | {mean:+.3f} | {std:.3f} | {se} |"


def delta_series(data: dict[str, dict[int, list[dict]]], baseline: str) -> dict[str, list[tuple[float, float, float]]]:
    """Per variant but the baseline: (tokens, Δ mean loss vs baseline, its SE: nan with one seed) per shared budget."""
    base, out = data.get(baseline, {}), {}
    for variant, budgets in data.items():
        if variant == baseline:
            continue
        shared = sorted(s for s in budgets if s in base)
        losses = [([r["eval_loss"] for r in budgets[s]], [r["eval_loss"] for r in base[s]]) for s in shared]
        out[variant] = [(budgets[s][0]["tokens"], *verdict(*pair)[:2]) for s, pair in zip(shared, losses, strict=True)]
    return out


def plot(data: dict[str, dict[int, list[dict]]], path: Path, baseline: str) -> None:
    """Val loss (mean ± sample std over seeds) against tokens and FLOPs, and its Δ from the baseline against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for variant, budgets in data.items():
        steps = sorted(budgets)
        y = [_stats([r["eval_loss"] for r in budgets[s]]) for s in steps]
        for ax, key in zip(axes, ("tokens", "flops"), strict=False):
            x = [statistics.fmean(r[key] for r in budgets[s]) for s in steps]
            ax.errorbar(x, [m for m, _, _ in y], yerr=[e for _, e, _ in y], marker="o", capsize=3, label=variant)
    for ax, label in zip(axes, ("training tokens", "training FLOPs"), strict=False):
        ax.set_xlabel(label)
        ax.set_ylabel("val loss (mean ± sample std over seeds)")
    _delta_panel(axes[2], data, baseline)
    for ax in axes:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def _delta_panel(ax, data: dict[str, dict[int, list[dict]]], baseline: str) -> None:
    """Δ loss from the baseline per variant (± SE where both have 2+ seeds), over a band of the baseline's seed std."""
    base = data.get(baseline, {})
    steps = sorted(s for s in base if len(base[s]) > 1)
    if steps:
        x = [base[s][0]["tokens"] for s in steps]
        std = [_stats([r["eval_loss"] for r in base[s]])[1] for s in steps]
        ax.fill_between(x, [-v for v in std], std, color="0.85", label=f"± {baseline} seed std")
    ax.axhline(0.0, color="0.4", linewidth=0.8)
    colors = {variant: f"C{index}" for index, variant in enumerate(data)}  # as in the other panels
    for variant, series in delta_series(data, baseline).items():
        x, diff, se = zip(*series, strict=True) if series else ((), (), ())
        yerr = [0.0 if math.isnan(e) else e for e in se]
        ax.errorbar(x, diff, yerr=yerr, marker="o", capsize=3, label=variant, color=colors[variant])
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"Δ val loss vs {baseline} (mean; ± SE)")


def report(
    sweep: Sweep, rows: list[dict], out_dir: Path, baseline: str | None = None,
    pairs: list[list[str]] | None = None, analyze: list[str] | None = None,
) -> str:  # fmt: skip
    """The crossover tables, where each variant overtakes the baseline, paired comparisons and the plot."""
    baseline = baseline or sweep.runs[0].variant
    data = points(sweep, rows)
    lines = [
        "## Budget crossover",
        "",
        f"Every variant against **{baseline}** at each budget: mean ± sample std over seeds; Δ is the",
        "difference of the means with its standard error √(s²/n + s²/n), 'ahead' or 'behind' when it",
        f"exceeds {Z:g} standard errors. 'Δ loss at equal FLOPs' compares with {baseline}'s loss",
        "interpolated (linear in log FLOPs) at the variant's FLOPs; where those lie beyond its budgets,",
        f"the variant's own loss interpolated at {baseline}'s FLOPs of that budget (†; '—' where neither",
        "is inside the other's budgets, as nothing is extrapolated). CPU and wall",
        "hours are per run (mean over seeds), summed over its attempts, and a branch's include its trunk's",
        "share up to the branch point; wall hours also count time a run waited on a shared or paused machine.",
        "",
        *budget_table(data, baseline),
        "",
        f"Where each variant overtakes {baseline} (ahead at that budget and at every larger one):",
        "",
        *crossover_lines(data, baseline),
        "",
    ]
    if pairs:
        lines += ["### Paired comparisons", "", *pair_table(data, pairs), ""]
    if analyze:
        from megamoe.sweep.reports.lory_domains import domain_section

        lines += domain_section(sweep, data, analyze)
    lines.append("")
    plot(data, out_dir / PLOT, baseline)
    return "\n".join([*lines, f"![val loss against tokens and FLOPs, and its Δ from {baseline}]({PLOT})", ""])
