"""Every shipped YAML config loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from megamoe.config import load_config

ROOT = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name != "sweeps")
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.name == path.stem


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_loads(path):
    """Every run of a shipped sweep has a valid config."""
    from megamoe.sweep.spec import load_sweep

    assert load_sweep(path).runs


def test_inheritance_in_shipped_configs():
    root = Path(__file__).resolve().parents[2] / "configs" / "debug"
    cfg = load_config(root / "cpu_tiny_gqa.yaml")
    assert (cfg.model.d_model, cfg.model.num_kv_heads, cfg.model.tie_embeddings) == (64, 2, True)
