"""Lory's per-domain routing weights for the crossover report (the Lory paper's specialization view).

For each named variant it takes every seed's run at the largest budget, runs `megamoe analyze` on each
once (kept in <run>/analysis/, which the archive keeps), and reports per run and layer the domain
specialization: the token-weighted
mean over domains of the Jensen–Shannon divergence (nats) between the domain's average routing weights
and the average over all domains (0: every domain routed alike; ln 2 is the most two distributions can
differ). The report links the lowest seed's heatmaps of the layer `megamoe analyze` studies in detail.
A run restored from the archive without its analysis has no checkpoint to analyse; it is named, not
analysed.
"""

from __future__ import annotations

import numpy as np

from megamoe.sweep.reports.analyses import analyse
from megamoe.sweep.spec import Sweep


def js_divergence(p_GE: np.ndarray, q_E: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence (nats) of each row of p_GE from q_E."""
    m_GE = (p_GE + q_E) / 2

    def kl(a_GE: np.ndarray) -> np.ndarray:
        safe_GE = a_GE > 0  # 0 · log 0 = 0; where a > 0, m ≥ a/2 > 0
        return np.where(safe_GE, a_GE * np.log(np.where(safe_GE, a_GE, 1) / np.where(safe_GE, m_GE, 1)), 0).sum(1)

    return (kl(p_GE) + kl(np.broadcast_to(q_E, p_GE.shape))) / 2


def domain_specialization(weight_TE: np.ndarray, domain_T: np.ndarray) -> float:
    """Token-weighted mean JS divergence of each domain's mean routing weights from the overall mean."""
    keys_G, index_T = np.unique(domain_T, return_inverse=True)
    tokens_G = np.bincount(index_T, minlength=len(keys_G)).astype(np.float64)
    sums_GE = np.zeros((len(keys_G), weight_TE.shape[1]))
    np.add.at(sums_GE, index_T, weight_TE.astype(np.float64))
    mean_GE = sums_GE / sums_GE.sum(1, keepdims=True)
    overall_E = sums_GE.sum(0) / sums_GE.sum()
    return float((js_divergence(mean_GE, overall_E) * tokens_G).sum() / tokens_G.sum())


def analysed(run_dir, step: int):
    """The run's routing recording at step, from `megamoe analyze` on 64 sequences (run once, into analysis/)."""
    from megamoe.analysis.record import Recording

    analyse(run_dir, step, ["--max-sequences", "64"], "analysis", report="crossover")
    return Recording.load(run_dir / "analysis" / f"routing_step_{step}.npz")


def analysable(run_dir, step: int) -> bool:
    """The run has its routing recording at step, or a checkpoint to make it from."""
    return (run_dir / "analysis" / f"routing_step_{step}.npz").is_file() or (run_dir / "checkpoints").is_dir()


def _domain_row(variant: str, seed: int, per_layer: list[float]) -> str:
    """One run's row: its specialization per layer and their mean, in nats to 4 decimals."""
    cells = [*per_layer, sum(per_layer) / len(per_layer)]
    return f"| {variant} | {seed} | " + " | ".join(f"{d:.4f}" for d in cells) + " |"


def domain_section(sweep: Sweep, data: dict[str, dict[int, list[dict]]], variants: list[str]) -> list[str]:
    """Markdown: domain specialization per layer of each variant, and links to its heatmaps."""
    from megamoe.analysis.report import default_layer

    runs = {run.name: run for run in sweep.runs}
    lines = ["### Lory: routing weight by domain", ""]
    table, images = [], []
    for variant in variants:
        budgets = data.get(variant)
        if not budgets:
            lines.append(f"- {variant}: no finished run yet.")
            continue
        steps, pictured = max(budgets), False
        for row in sorted(budgets[steps], key=lambda r: r["seed"]):
            run = runs[row["run"]]
            if not analysable(run.run_dir, steps):
                lines.append(f"- {run.name}: restored from the archive without its analysis and checkpoints.")
                continue
            rec = analysed(run.run_dir, steps)
            per_layer = {layer: domain_specialization(p["weight_TE"], rec.domain_T) for layer, p in rec.layers.items()}
            table.append((variant, row["seed"], per_layer))
            if not pictured:  # the lowest analysed seed's heatmaps
                layer, pictured = default_layer(rec), True
                images.append(f"![{variant}: layer {layer}]({run.name}/analysis/lory_domain_L{layer}.png)")
    if table:
        layers = list(table[0][2])
        lines += [
            "Domain specialization: the token-weighted mean Jensen–Shannon divergence (nats) between each",
            "domain's mean routing weights and the mean over all domains, on 64 validation sequences, for each",
            "seed's run at the largest budget; the last column is the mean over the layers.",
            "",
            "| variant | seed | " + " | ".join(f"layer {i}" for i in layers) + " | mean |",
            "|---|---|" + "---|" * (len(layers) + 1),
            *(_domain_row(v, seed, [d[i] for i in layers]) for v, seed, d in table),
            "",
            *images,
            "",
        ]
    return lines
