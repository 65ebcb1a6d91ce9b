"""Early routing learning (OpenMoE §5): how much each token id's routing changes across checkpoints.

For every token id with at least min_count occurrences in the recorded tokens (the same tokens at
every checkpoint), its distribution over experts at each checkpoint; reported per checkpoint: the
mean Jensen–Shannon divergence (nats) to the final checkpoint's distribution and to the previous
checkpoint's, and the fraction of those token ids whose most-used expert is the final one's.
"""

from __future__ import annotations

import numpy as np

from megamoe.analysis.specialization import grouping_table, token_decisions


def js_divergence(p_GE: np.ndarray, q_GE: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence (nats) of each row pair."""
    m_GE = 0.5 * (p_GE + q_GE)

    def kl(a, b):
        safe = np.where(a > 0, a / np.where(b > 0, b, 1), 1)
        return (a * np.log(safe)).sum(1)

    return 0.5 * kl(p_GE, m_GE) + 0.5 * kl(q_GE, m_GE)


def token_distributions(recordings, layer: int, min_count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(token ids, each checkpoint's (G, E) distributions for them)."""
    token_T = recordings[0].token_T
    for rec in recordings[1:]:
        if not np.array_equal(rec.token_T, token_T):
            raise ValueError("early routing: the checkpoints were recorded on different tokens")
    keys = np.unique(token_T)
    experts = recordings[0].meta["num_experts"]
    tables = [grouping_table(token_decisions(r.layers[layer], experts), token_T, keys, min_count) for r in recordings]
    return tables[0]["keys"], [t["ratio_GE"] for t in tables]


def early_routing(recordings, layer: int, min_count: int) -> list[dict]:
    """One row per checkpoint: step, JS to final, JS to previous, fraction keeping the final top expert."""
    keys, dists = token_distributions(recordings, layer, min_count)
    final = dists[-1]
    if not len(keys):
        raise ValueError(f"early routing: no token id occurs {min_count} times; lower --min-count")
    rows = []
    for i, (rec, dist) in enumerate(zip(recordings, dists, strict=True)):
        prev = dists[i - 1] if i else dist
        rows.append({
            "step": rec.meta["step"],
            "token_ids": len(keys),
            "js_to_final": float(js_divergence(dist, final).mean()),
            "js_to_previous": float(js_divergence(dist, prev).mean()),
            "same_top_expert_as_final": float((dist.argmax(1) == final.argmax(1)).mean()),
        })  # fmt: skip
    return rows
