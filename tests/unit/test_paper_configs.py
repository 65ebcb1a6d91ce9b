"""Paper-shaped configs reproduce the papers' parameter counts (computed on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megamoe.config import load_config
from megamoe.config.resolve import with_vocab
from megamoe.model.params import meta_counts

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"


def counts(name: str, *overrides: str):
    """Parameter counts of a paper config."""
    cfg = load_config(PAPER / f"{name}.yaml", list(overrides))
    cfg = with_vocab(cfg, cfg.model.vocab_size, "config")
    return meta_counts(cfg.model, moe=cfg.moe), cfg


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("grin_16x3.8b", 42e9, 6.6e9), ("rmoe_0.91b", 0.91e9, 0.53e9)],
)
def test_paper_parameter_counts(name, total, active):
    got, _ = counts(name)
    assert got.total == pytest.approx(total, rel=0.02)
    assert got.active == pytest.approx(active, rel=0.02)


def test_rmoe_extra_router_parameters_match_the_formula():
    """§3.1: n_moe·(d·p + p·E) + 6p² + 6p − n_moe·d·E ≈ 3.59M for the 0.91B model."""
    gru, cfg = counts("rmoe_0.91b")
    linear, _ = counts("rmoe_0.91b", "moe.scorer=linear")
    n, d, p, e = cfg.model.num_layers, cfg.model.d_model, cfg.moe.gru_hidden, cfg.moe.num_experts
    formula = n * (d * p + p * e) + 6 * p * p + 6 * p - n * d * e
    assert gru.total - linear.total == formula
    assert formula == pytest.approx(3.59e6, rel=0.01)
