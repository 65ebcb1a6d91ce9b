"""Context-independent specialization (OpenMoE §5, Appendix E): routing distributions by domain, token id, position.

Shape legend: T tokens, E experts, K choices, G groups (domains, token ids or positions).
A routing decision is one (token, expert) choice. Token choice counts every requested choice
before dropping (OpenMoE's analysis does not say; `after_drop` counts only kept ones); expert
choice counts a token for each expert that picked it; Lory counts each token's routing weights
(soft). The ratio of group g to expert e is its decisions to e over all its decisions. Its
standard deviation across experts is compared with the "uniform reference": the expected std
of the ratios of the same number of decisions from a uniform router (k distinct experts per token).
"""

from __future__ import annotations

import numpy as np

UNIFORM_DRAWS = 256
"""Monte Carlo samples per distinct group size for the uniform reference."""


def token_decisions(layer: dict[str, np.ndarray], num_experts: int, after_drop: bool = False) -> np.ndarray:
    """Each token's routing decisions per expert (counts, or Lory's weights), float64."""
    if "choice_TK" in layer:
        choice_TK = layer["choice_TK"].astype(np.int64)
        mask_TK = layer["kept_TK"].astype(bool) if after_drop else np.ones(choice_TK.shape, bool)
        out_TE = np.zeros((len(choice_TK), num_experts))
        rows = np.repeat(np.arange(len(choice_TK)), choice_TK.shape[1])
        np.add.at(out_TE, (rows, choice_TK.ravel()), mask_TK.ravel())
        return out_TE
    if "segment_SE" in layer:
        return layer["weight_TE"].astype(np.float64)
    return (layer["weight_TE"] > 0).astype(np.float64)


def group_counts(dec_TE: np.ndarray, key_T: np.ndarray, num_groups: int) -> np.ndarray:
    """Decisions per (group, expert)."""
    out_GE = np.zeros((num_groups, dec_TE.shape[1]))
    np.add.at(out_GE, key_T, dec_TE)
    return out_GE


def ratios(counts_GE: np.ndarray) -> np.ndarray:
    """Each group's distribution over experts (rows of zeros stay zero)."""
    total_G1 = counts_GE.sum(1, keepdims=True)
    return np.divide(counts_GE, total_G1, out=np.zeros_like(counts_GE), where=total_G1 > 0)


def uniform_std(sizes_G: np.ndarray, num_experts: int, k: int = 1, seed: int = 0) -> np.ndarray:
    """Expected std across experts of the ratios of a uniform router's sample of each size (decisions).

    With k distinct experts per token the counts' covariance is (E − k)/(E − 1) times a multinomial's
    with the same number of decisions, so the multinomial draws' std is scaled by its square root."""
    rng = np.random.default_rng(seed)
    scale = np.sqrt((num_experts - k) / (num_experts - 1)) if num_experts > 1 else 0.0
    out = np.zeros(len(sizes_G))
    for size in np.unique(sizes_G):
        n = max(round(float(size)), 1)
        draws_RE = rng.multinomial(n, np.full(num_experts, 1 / num_experts), size=UNIFORM_DRAWS) / n
        out[sizes_G == size] = scale * draws_RE.std(1).mean()
    return out


def grouping_table(dec_TE: np.ndarray, key_T: np.ndarray, keys: np.ndarray, min_count: int = 0, k: int = 1) -> dict:
    """For the groups in keys with ≥ min_count tokens: size, ratios, std across experts, uniform reference."""
    counts_GE = group_counts(dec_TE, np.searchsorted(keys, key_T), len(keys))
    tokens_G = np.bincount(np.searchsorted(keys, key_T), minlength=len(keys))
    keep = tokens_G >= max(min_count, 1)
    counts_GE, keys, tokens_G = counts_GE[keep], keys[keep], tokens_G[keep]
    ratio_GE = ratios(counts_GE)
    return {
        "keys": keys,
        "tokens": tokens_G,
        "ratio_GE": ratio_GE,
        "std": ratio_GE.std(1),
        "uniform_std": uniform_std(counts_GE.sum(1), dec_TE.shape[1], k),
    }


def top_tokens(dec_TE: np.ndarray, token_T: np.ndarray, vocab_size: int, k: int = 10) -> np.ndarray:
    """The k token ids most often routed to each expert (raw counts), (E, k)."""
    counts_VE = group_counts(dec_TE, token_T, vocab_size)
    order_EV = np.argsort(-counts_VE.T, axis=1, kind="stable")
    return order_EV[:, :k]
