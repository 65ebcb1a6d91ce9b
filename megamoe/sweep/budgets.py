"""Budget sweeps: each run at several train.max_steps, the smaller ones as WSD cooldown branches.

`budgets: [S1, ..., Smax]` in a sweep file (ascending, distinct, positive) gives every (variant, grid
point, seed) one run per budget, named `<run>-steps<S>`. The run at Smax is the trunk; it also saves
(and never prunes) a checkpoint at each smaller budget's branch point b(S) = S - round(f·S), with
f = optim.decay_fraction. The run at S is a branch: it starts from a copy of the trunk's checkpoint
b(S) and trains to S. Under optim.decay_style=wsd the learning rate before b(S) does not depend on
train.max_steps, and the data order depends only on the seed and the step, so the branch is exactly
the run a fresh S-step run would be, for the cost of its S - b(S) cooldown steps.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from megamoe.config import Config
from megamoe.errors import ConfigError


def parse_budgets(path: Path, spec: dict) -> tuple[int, ...] | None:
    """The sweep's budgets (None without the key); an error names the sweep file and the key."""
    raw = spec.get("budgets")
    if raw is None:
        return None
    ok = isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in raw)
    if not ok:
        raise ConfigError(f"{path}: budgets", f"must be a non-empty list of positive train.max_steps, got {raw!r}")
    if any(a >= b for a, b in itertools.pairwise(raw)):
        raise ConfigError(f"{path}: budgets", f"must be ascending and distinct, got {raw}")
    for field in ("grid", "zip"):
        if "train.max_steps" in (spec.get(field) or {}):
            raise ConfigError(f"{path}: {field}", "train.max_steps is set by budgets; vary it there")
    return tuple(raw)


def parse_largest_only(path: Path, spec: dict, budgets: tuple[int, ...] | None) -> list[int]:
    """The seeds trained at the largest budget only (a trunk without branches); [] without the key."""
    raw = spec.get("largest_budget_seeds")
    if raw is None:
        return []
    key = f"{path}: largest_budget_seeds"
    if budgets is None or not spec.get("seeds"):
        raise ConfigError(key, "needs budgets and seeds: it adds seeds at the largest budget only")
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise ConfigError(key, f"must be a non-empty list of integer seeds, got {raw!r}")
    both = sorted(set(raw) & set(spec["seeds"]))
    if both or len(set(raw)) != len(raw):
        raise ConfigError(key, f"must be distinct seeds not in seeds (those run at every budget already), got {raw}")
    return list(raw)


def budget_problem(cfg: Config, budgets: tuple[int, ...]) -> str | None:
    """Why a run's config cannot take part in a budget sweep (None: it can)."""
    from megamoe.train.upcycle import warmup_steps  # Lory's dense warm-up: ⌊fraction · max_steps⌋

    optim = cfg.optim
    if optim.decay_style != "wsd":
        return f"needs optim.decay_style=wsd (branches share the trunk's learning rates), got {optim.decay_style}"
    first = optim.decay_start(budgets[0])
    if not 0 < optim.warmup_steps < first:
        return (
            f"needs an explicit optim.warmup_steps > 0 and < {first}, the smallest budget's decay start "
            f"({budgets[0]} - round({optim.decay_fraction} · {budgets[0]})), got {optim.warmup_steps}"
        )
    dense = {warmup_steps(_with_steps(cfg, steps)) for steps in budgets}
    if len(dense) > 1:
        return (
            f"Lory's dense warm-up (moe.dense_warmup_fraction · train.max_steps) differs between budgets: {dense}; "
            "set its length with moe.dense_warmup_steps"
        )
    return None


def _with_steps(cfg: Config, steps: int) -> Config:
    """A shallow copy of cfg whose train.max_steps is steps."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))
