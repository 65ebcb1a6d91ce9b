"""How similar adjacent documents are in an order, against a seeded random order of the same documents."""

from __future__ import annotations

import numpy as np


def adjacent_cosine(emb_NK: np.ndarray, order: np.ndarray, batch: int = 65536) -> float:
    """Mean cosine similarity of consecutive documents in `order` (unit-norm embeddings)."""
    if len(order) < 2:
        return float("nan")
    total = 0.0
    for start in range(0, len(order) - 1, batch):
        a = np.asarray(emb_NK[order[start : start + batch]], dtype=np.float32)
        b = np.asarray(emb_NK[order[start + 1 : start + 1 + batch]], dtype=np.float32)
        total += float(np.einsum("nd,nd->", a[: len(b)], b))
    return total / (len(order) - 1)


def adjacent_same_domain(domain_N: np.ndarray, order: np.ndarray) -> float:
    """Fraction of consecutive pairs in `order` from the same domain."""
    if len(order) < 2:
        return float("nan")
    d = domain_N[order]
    return float(np.mean(d[1:] == d[:-1]))


def quality_report(emb_NK: np.ndarray, domain_N: np.ndarray, order: np.ndarray, seed: int) -> dict[str, float]:
    """Adjacent cosine and same-domain fraction of `order` and of a random permutation of it."""
    shuffled = np.random.default_rng([seed, 6]).permutation(order)
    return {
        "adjacent_cosine": adjacent_cosine(emb_NK, order),
        "adjacent_cosine_random": adjacent_cosine(emb_NK, shuffled),
        "adjacent_same_domain": adjacent_same_domain(domain_N, order),
        "adjacent_same_domain_random": adjacent_same_domain(domain_N, shuffled),
    }
