"""Router statistics of the RMoE paper's analysis (§5): cross-layer mutual information, gate entropy,
inner balance (median top-1 / top-2 score) and outer balance (mean sum of the selected scores).

Mutual information between two layers: each token's router probability vector is discretized
into 100 equal-width bins per entry, and sklearn's mutual_info_score is taken between the two
layers' binned entries paired by (token, expert), as the paper describes.
"""

from __future__ import annotations

import numpy as np

MI_BINS = 100


def gate_entropy(probs_TE: np.ndarray) -> float:
    """Mean per-token entropy (nats) of the router's score distribution (normalized to sum 1)."""
    p_TE = probs_TE / np.maximum(probs_TE.sum(1, keepdims=True), 1e-30)
    return float(-(p_TE * np.log(np.where(p_TE > 0, p_TE, 1))).sum(1).mean())


def inner_balance(probs_TE: np.ndarray) -> float:
    """Median over tokens of top-1 score / top-2 score."""
    top2_T2 = -np.sort(-probs_TE, axis=1)[:, :2]
    return float(np.median(top2_T2[:, 0] / np.maximum(top2_T2[:, 1], 1e-30)))


def outer_balance(probs_TE: np.ndarray, k: int) -> float:
    """Mean over tokens of the sum of the top-k scores."""
    return float((-np.sort(-probs_TE, axis=1)[:, :k]).sum(1).mean())


def cross_layer_mi(probs_by_layer: list[np.ndarray]) -> np.ndarray:
    """(layers, layers) mutual information (nats) of the binned router probabilities."""
    from sklearn.metrics import mutual_info_score

    binned = [np.minimum((p * MI_BINS).astype(np.int64), MI_BINS - 1).ravel() for p in probs_by_layer]
    n = len(binned)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = mutual_info_score(binned[i], binned[j])
    return out
