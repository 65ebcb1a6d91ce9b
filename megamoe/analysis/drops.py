"""Drop-towards-the-end (OpenMoE §5): the fraction of tokens dropped by the capacity, by position and domain.

Token choice with a capacity only (moe.eval_capacity_factor > 0 at evaluation). A token counts
as dropped "first" when its first choice was dropped, and "any" when at least one choice was.
Positions are grouped into buckets of equal width.
"""

from __future__ import annotations

import numpy as np


def drop_flags(layer: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(first choice dropped, any choice dropped) per token, or None without capacity records."""
    if "kept_TK" not in layer:
        return None
    kept_TK = layer["kept_TK"].astype(bool)
    return ~kept_TK[:, 0], ~kept_TK.all(1)


def drops_by_position(
    flags: tuple[np.ndarray, np.ndarray], position_T: np.ndarray, buckets: int
) -> list[dict[str, float]]:
    """Per position bucket: first-choice and any-choice drop ratio."""
    width = max(1, -(-int(position_T.max() + 1) // buckets))
    bucket_T = position_T // width
    tokens = np.bincount(bucket_T)
    rows = []
    for b in np.flatnonzero(tokens):
        at = bucket_T == b
        rows.append({
            "positions": f"{b * width}-{(b + 1) * width - 1}",
            "tokens": int(tokens[b]),
            "dropped_first": float(flags[0][at].mean()),
            "dropped_any": float(flags[1][at].mean()),
        })  # fmt: skip
    return rows


def drops_by_domain(flags, domain_T: np.ndarray, domains: list[str]) -> list[dict[str, float]]:
    """Per domain: tokens and drop ratios."""
    rows = []
    for d, name in enumerate(domains):
        at = domain_T == d
        if at.any():
            rows.append({"domain": name, "tokens": int(at.sum()), "dropped_first": float(flags[0][at].mean()),
                         "dropped_any": float(flags[1][at].mean())})  # fmt: skip
    return rows
