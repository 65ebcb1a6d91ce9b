"""The routing report: every analysis that applies to the run, as PNG plots, CSV tables and one report.md."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from megamoe.analysis import drops, early, router_stats, specialization
from megamoe.analysis.bias import bias_trajectories
from megamoe.analysis.record import Recording
from megamoe.utils.fs import atomic_write_text

POSITION_BUCKETS = 16


class Report:
    """Collects markdown sections and writes figures and tables next to report.md."""

    def __init__(self, out: Path):
        self.out, self.lines = out, []

    def add(self, *lines: str) -> None:
        """Append markdown lines."""
        self.lines.extend(lines)

    def table(self, rows: list[dict], name: str, floats: str = "{:.4f}") -> None:
        """A markdown table of rows, also written to name.csv."""
        if not rows:
            return
        with open(self.out / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        cols = list(rows[0])
        self.add("| " + " | ".join(cols) + " |", "|" + "---|" * len(cols))
        for row in rows:
            cells = [floats.format(v) if isinstance(v, float) else str(v) for v in row.values()]
            self.add("| " + " | ".join(cells) + " |")
        self.add("", f"([{name}.csv]({name}.csv))", "")

    def heatmap(self, matrix, rows: list[str], cols: list[str], title: str, name: str) -> None:
        """A heatmap PNG, linked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(cols), 1.2 + 0.25 * len(rows)))
        im = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
        self._save(fig, name)

    def lines_plot(self, x, series: dict[str, np.ndarray], xlabel: str, ylabel: str, title: str, name: str) -> None:
        """A line plot PNG, linked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, y in series.items():
            ax.plot(x, y, marker=".", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        self._save(fig, name)

    def _save(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=110)
        plt.close(fig)
        self.add(f"![{name}]({name}.png)", "")

    def write(self) -> Path:
        """report.md."""
        path = self.out / "report.md"
        atomic_write_text(path, "\n".join(self.lines) + "\n")  # its presence marks a finished analysis
        return path


def default_layer(recording: Recording) -> int:
    """OpenMoE analyses the third MoE layer; fewer MoE layers: the last."""
    layers = list(recording.layers)
    return layers[2] if len(layers) > 2 else layers[-1]


def write_report(recordings: list[Recording], out: Path, decode, layer: int | None, min_count: int) -> Path:
    """Every applicable analysis of the recordings (sorted by step; the last is analysed in detail)."""
    final = recordings[-1]
    layer = default_layer(final) if layer is None else layer
    if layer not in final.layers:
        raise ValueError(f"--layer {layer}: not a MoE layer (MoE layers: {list(final.layers)})")
    rep, meta = Report(out), final.meta
    rep.add(
        f"# Routing report: {meta['run']}",
        "",
        f"routing `{meta['routing']}`, {meta['num_experts']} experts, checkpoints at steps "
        f"{[r.meta['step'] for r in recordings]}; {len(final.token_T):,} tokens of {meta['source']}; "
        f"MoE layers {list(final.layers)}, layer {layer} in detail.",
        "",
    )
    _specialization(rep, final, layer, decode, min_count)
    if len(recordings) > 1:
        _early(rep, recordings, layer, min_count)
    _drops(rep, final, layer)
    _expert_bias(rep, Path(meta["run"]))
    if meta["routing"] == "lory":
        _lory(rep, final)
    else:
        _router(rep, final)
    return rep.write()


def _specialization(rep: Report, rec: Recording, layer: int, decode, min_count: int) -> None:
    experts, domains = rec.meta["num_experts"], rec.meta["domains"]
    dec_TE = specialization.token_decisions(rec.layers[layer], experts)
    rep.add(
        "## Context-independent specialization",
        "",
        "Ratio of routing decisions to each expert per group; std across experts vs the uniform "
        "multinomial reference of the same size.",
        "",
    )
    groups = {
        "domain": (rec.domain_T, 0),
        f"token id (>= {min_count} occurrences)": (rec.token_T, min_count),
        "position": (rec.position_T, 0),
    }
    summary, tables = [], {}
    for name, (key_T, floor) in groups.items():
        t = specialization.grouping_table(dec_TE, key_T, np.unique(key_T), floor, choices_per_token(rec, layer))
        tables[name] = t
        ratio = float(t["std"].mean() / t["uniform_std"].mean()) if len(t["keys"]) else float("nan")
        summary.append(
            {
                "grouping": name,
                "groups": len(t["keys"]),
                "mean_std": float(t["std"].mean()) if len(t["keys"]) else float("nan"),
                "uniform_std": float(t["uniform_std"].mean()) if len(t["keys"]) else float("nan"),
                "std_over_uniform": ratio,
            }
        )
    rep.table(summary, "specialization_summary")
    dom = tables["domain"]
    rep.heatmap(
        dom["ratio_GE"],
        [domains[k] for k in dom["keys"]],
        [str(e) for e in range(experts)],
        f"layer {layer}: routing ratio by domain",
        "specialization_domain",
    )
    tok = tables[f"token id (>= {min_count} occurrences)"]
    rep.table(
        [
            {"token": repr(decode(int(k))), "id": int(k), "tokens": int(n), "std": float(s), "uniform_std": float(u)}
            for k, n, s, u in zip(tok["keys"], tok["tokens"], tok["std"], tok["uniform_std"])
        ][:40],
        "specialization_token",
    )
    pos = tables["position"]
    rep.lines_plot(
        pos["keys"],
        {"std across experts": pos["std"], "uniform reference": pos["uniform_std"]},
        "position",
        "std of routing ratios",
        f"layer {layer}: by position",
        "specialization_position",
    )
    _top_tokens(rep, dec_TE, rec.token_T, decode)


def _top_tokens(rep: Report, dec_TE: np.ndarray, token_T: np.ndarray, decode) -> None:
    """The ten tokens sent most often to each expert."""
    top_Ek = specialization.top_tokens(dec_TE, token_T, int(token_T.max()) + 1)
    rep.add("Top-10 tokens per expert (raw counts):", "")
    rep.table(
        [{"expert": e, "tokens": " ".join(repr(decode(int(t))) for t in row)} for e, row in enumerate(top_Ek)],
        "top_tokens",
    )


def choices_per_token(rec: Recording, layer: int) -> int:
    """k of the uniform reference: top-k for token choice, 1 for expert choice and Lory's soft weights."""
    return rec.layers[layer]["choice_TK"].shape[1] if "choice_TK" in rec.layers[layer] else 1


def _early(rep: Report, recordings: list[Recording], layer: int, min_count: int) -> None:
    rep.add(
        "## Early routing learning",
        "",
        f"Token ids with >= {min_count} occurrences: Jensen-Shannon divergence (nats) of their routing "
        "distribution to the final checkpoint's, and the fraction keeping the final top expert.",
        "",
    )
    try:
        rows = early.early_routing(recordings, layer, min_count)
    except ValueError as err:
        rep.add(str(err), "")
        return
    rep.table(rows, "early_routing")
    steps = [r["step"] for r in rows]
    rep.lines_plot(
        steps,
        {
            "JS to final": np.array([r["js_to_final"] for r in rows]),
            "same top expert as final": np.array([r["same_top_expert_as_final"] for r in rows]),
        },
        "step",
        "",
        f"layer {layer}: early routing",
        "early_routing",
    )


def _drops(rep: Report, rec: Recording, layer: int) -> None:
    rep.add("## Drop-towards-the-end", "")
    flags = drops.drop_flags(rec.layers[layer])
    if flags is None:
        rep.add("Not applicable: no token-choice capacity records (expert choice, Lory or dense).", "")
        return
    if not flags[1].any():
        rep.add(
            f"No token was dropped at evaluation (eval capacity factor {rec.meta['eval_capacity_factor']}; "
            "0 = dropless). Re-run with --eval-capacity-factor to study drops.",
            "",
        )
        return
    rows = drops.drops_by_position(flags, rec.position_T, POSITION_BUCKETS)
    rep.table(rows, "drops_by_position")
    rep.lines_plot(
        np.arange(len(rows)),
        {
            "first choice": np.array([r["dropped_first"] for r in rows]),
            "any choice": np.array([r["dropped_any"] for r in rows]),
        },
        "position bucket",
        "drop ratio",
        f"layer {layer}: drops by position",
        "drops_by_position",
    )
    rep.table(drops.drops_by_domain(flags, rec.domain_T, rec.meta["domains"]), "drops_by_domain")


def _expert_bias(rep: Report, run_dir: Path) -> None:
    """aux_free: each layer's per-expert selection bias over training (from the logged metrics)."""
    trajectories = bias_trajectories(run_dir)
    if not trajectories:
        return
    rep.add(
        "## Expert bias (auxiliary-loss-free balancing)",
        "",
        "The per-expert bias added to the scores for the top-k choice, after each logged step: an expert "
        "the global batch overloads is pushed down by moe.bias_update_rate per step, an underloaded one up.",
        "",
    )
    for layer, (steps_S, bias_SE) in trajectories.items():
        series = {f"e{e}": bias_SE[:, e] for e in range(bias_SE.shape[1])}
        rep.lines_plot(steps_S, series, "step", "bias", f"layer {layer}: expert bias", f"expert_bias_L{layer}")


def _lory(rep: Report, rec: Recording) -> None:
    experts, domains = rec.meta["num_experts"], rec.meta["domains"]
    rep.add("## Lory: routing weight by domain and expert utilization", "")
    rows = []
    for layer, parts in rec.layers.items():
        t = specialization.grouping_table(parts["weight_TE"].astype(np.float64), rec.domain_T, np.unique(rec.domain_T))
        rep.heatmap(
            t["ratio_GE"],
            [domains[k] for k in t["keys"]],
            [str(e) for e in range(experts)],
            f"layer {layer}: average routing weight by domain",
            f"lory_domain_L{layer}",
        )
        active_SE = parts["segment_SE"] > 2.0 / experts
        rows.append(
            {
                "layer": layer,
                "segments": len(active_SE),
                "experts_used": int(active_SE.any(0).sum()),
                **{f"e{e}": float(active_SE[:, e].mean()) for e in range(experts)},
            }
        )
    rep.add("Utilization: fraction of segments in which each expert's weight exceeds 2/E.", "")
    rep.table(rows, "lory_utilization", "{:.3f}")


def _router(rep: Report, rec: Recording) -> None:
    k = rec.meta["top_k"]
    rep.add(
        "## Router statistics (RMoE analysis)",
        "",
        "Gate entropy (nats), inner balance IB = median top-1/top-2 score, outer balance OB = mean sum of the "
        f"top-{k} scores; cross-layer mutual information of the router probabilities (100 bins).",
        "",
    )
    probs = {layer: parts["probs_TE"] for layer, parts in rec.layers.items() if "probs_TE" in parts}
    rows = [
        {
            "layer": layer,
            "gate_entropy": router_stats.gate_entropy(p),
            "inner_balance": router_stats.inner_balance(p),
            "outer_balance": router_stats.outer_balance(p, k),
        }
        for layer, p in probs.items()
    ]
    rep.table(rows, "router_stats")
    if len(probs) > 1:
        mi = router_stats.cross_layer_mi(list(probs.values()))
        names = [str(layer) for layer in probs]
        rep.heatmap(mi, names, names, "cross-layer mutual information (nats)", "cross_layer_mi")
