"""Optimizer groups and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from megamoe.config import ModelConfig, OptimConfig
from megamoe.model import build_model
from megamoe.train.optim import build_optimizer, lr_at, warmup_steps


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_linear_and_constant_and_fraction():
    lin = OptimConfig(lr=2.0, warmup_steps=0, warmup_fraction=0.0, decay_style="linear", min_lr_ratio=0.0)
    assert lr_at(50, lin, 100) == pytest.approx(1.0)
    const = dataclasses.replace(lin, decay_style="constant")
    assert lr_at(99, const, 100) == 2.0
    assert warmup_steps(OptimConfig(warmup_fraction=0.05), 300) == 15
    assert math.isfinite(lr_at(0, OptimConfig(warmup_fraction=0.0), 1))


def test_weight_decay_only_on_matrices():
    model = build_model(ModelConfig(d_model=32, num_layers=1, num_heads=2, seq_len=8, vocab_size=64), 0)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_eval_batches_are_shared_in_lockstep():
    """Every DP rank runs the same number of eval forwards (EP exchanges tokens inside them); padding weighs 0."""
    import numpy as np

    from megamoe.train.evaluate import rank_share

    batches = [np.array([i]) for i in range(5)]
    shares = [rank_share(batches, r, 4) for r in range(4)]
    assert [len(s) for s in shares] == [2, 2, 2, 2]
    real = sorted(int(ids[0]) for share in shares for ids, w in share if w == 1.0)
    assert real == [0, 1, 2, 3, 4]
    assert sum(w for share in shares for _, w in share) == 5


def test_wsd_warmup_stable_then_linear_cooldown_to_the_floor():
    """M = 10, decay_fraction 0.3: peak through step 6, then 3 decayed updates, the last at the floor."""
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, decay_style="wsd", decay_fraction=0.3)
    assert cfg.decay_start(10) == 7
    got = [lr_at(s, cfg, 10) for s in range(11)]
    want = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.4, 0.1, 0.1]
    assert got == pytest.approx(want)
    assert lr_at(9, dataclasses.replace(cfg, decay_fraction=0.1), 10) == pytest.approx(0.1), "a 1-step cooldown decays"


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5, 0.9])
def test_wsd_before_the_decay_does_not_depend_on_max_steps(fraction):
    """What a budget sweep's branches rely on: with an explicit warm-up, a longer run shares every update before D0."""
    cfg = OptimConfig(lr=3e-3, warmup_steps=3, decay_style="wsd", decay_fraction=fraction)
    budgets = [b for b in range(8, 80) if cfg.warmup_length(b) <= cfg.decay_start(b)]
    for short, long in itertools.combinations(budgets, 2):
        assert cfg.decay_start(short) <= cfg.decay_start(long)
        for step in range(cfg.decay_start(short)):
            assert lr_at(step, cfg, short) == lr_at(step, cfg, long), (short, long, step)
    cosine = dataclasses.replace(cfg, decay_style="cosine")
    assert lr_at(5, cosine, 20) != lr_at(5, cosine, 40), "cosine has no such prefix: every step depends on M"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optim.decay_fraction=0"], r"optim.decay_fraction: must be in \(0, 1\], got 0.0"),
        (["optim.decay_fraction=1.5"], r"optim.decay_fraction: must be in \(0, 1\]"),
        (["optim.decay_style=wsd", "optim.decay_fraction=0.01", "train.max_steps=10"], r"is 0 decay steps"),
        (
            ["optim.decay_style=wsd", "optim.decay_fraction=0.5", "optim.warmup_steps=6", "train.max_steps=10"],
            r"optim.warmup_steps: wsd: the 6 warm-up steps end after the decay starts at step 5",
        ),
        (["train.checkpoint_steps=[0, 5]"], r"train.checkpoint_steps: steps must be in \[1, train.max_steps=270\]"),
        (["train.checkpoint_steps=[300]"], r"got \[300\]"),
    ],
)
def test_wsd_and_checkpoint_steps_errors_name_the_key(overrides, match):
    from megamoe.config import load_config
    from megamoe.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
