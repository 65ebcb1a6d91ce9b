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
