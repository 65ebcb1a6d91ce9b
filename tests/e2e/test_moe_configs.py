"""The debug MoE configs train on the embedded corpus and log their routing metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megamoe.config import load_config
from megamoe.train.metrics import read_metrics
from tests.util import single_process_trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "debug"
SMALL = ["data.max_documents=60", "data.vocab_size=512", "data.val_fraction=0.1", "train.max_steps=4",
         "train.eval_interval=0", "train.checkpoint_interval=0", "logging.log_interval=2", "logging.progress=false",
         "logging.wandb.mode=disabled", "train.micro_batch_size=4", "train.global_batch_size=8"]  # fmt: skip


@pytest.mark.parametrize("name", ["moe_top2", "moe_expert_choice", "openmoe_residual", "grin", "rmoe"])
def test_moe_config_trains(name, data_cache, tiny_data, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml", [*SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={tmp_path}"])
    summary = single_process_trainer(cfg).fit()
    assert math.isfinite(summary["eval/loss"]) and summary["step"] == 4
    logged = [r for r in read_metrics(tmp_path) if "train/loss" in r][-1]
    moe_layers = [i for i in range(cfg.model.num_layers) if cfg.moe.is_moe_layer(i)]
    for layer in moe_layers:
        assert {f"moe/L{layer}/{k}" for k in ("z", "load_cv", "drop", "drop_q4", "entropy", "dead")} <= set(logged)
    assert logged["moe/aux_loss"] > 0
    if name == "moe_expert_choice":
        assert logged[f"moe/L{moe_layers[0]}/load_cv"] == 0.0, "expert choice balances perfectly"
        assert f"moe/L{moe_layers[0]}/balance" in logged and logged[f"moe/L{moe_layers[0]}/balance"] == 0.0
    if name == "openmoe_residual":
        assert moe_layers == [1, 3]
