"""logging.router_health: per-step records from a real tiny RMoE run, moe.gru_bias_init, and the sweep report."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import yaml

from megamoe.errors import ConfigError
from megamoe.sweep.reports.router_health import COLUMNS, WINDOW
from megamoe.train import checkpoint as ckpt
from megamoe.train.metrics import ROUTER_HEALTH_FILE, read_metrics
from tests.e2e.test_train import cli
from tests.util import TINY, single_process_trainer, tiny_config

RMOE = ["moe.routing=topk", "moe.scorer=gru", "moe.num_experts=4", "moe.top_k=2", "moe.gru_hidden=8",
        "moe.capacity_factor=0", "moe.eval_capacity_factor=0"]  # fmt: skip
HEALTH = ["logging.router_health=true", "train.checkpoint_interval=2", "train.eval_interval=0"]


@pytest.mark.parametrize("bias", [0.0, 1.0])
def test_records_every_step_from_the_gru_bias_init(data_cache, tiny_data, tmp_path, bias):
    """One finite record per step; grad/all is the engine's clipped norm; biases start at gru_bias_init,
    and with biases at 1 every update gate starts at σ(2) = 0.88 that the zero-bias init avoids."""
    cfg = tiny_config(data_cache, tmp_path / "run", *RMOE, *HEALTH, "train.max_steps=3", f"moe.gru_bias_init={bias}")
    trainer = single_process_trainer(cfg)
    gru = trainer.model.router_gru
    assert torch.equal(gru.bias_ih, torch.full_like(gru.bias_ih, bias))
    assert torch.equal(gru.bias_hh, torch.full_like(gru.bias_hh, bias))
    trainer.fit()
    records = read_metrics(tmp_path / "run", ROUTER_HEALTH_FILE)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(v) for r in records for v in r.values())
    expected = {"grad/router", "grad/proj", "grad/gru", "grad/experts", "grad/other", "grad/all", "train/grad_norm"}
    per_layer = {"logit_std", "entropy", "top1", "h_abs", "h_sat", "h_spread", "update_gate", "cand_sat"}
    assert set(records[0]) == {"step"} | expected | {f"L{i}/{k}" for i in (0, 1) for k in per_layer}
    for r in records:
        assert r["grad/all"] == pytest.approx(r["train/grad_norm"], rel=1e-5)
        groups = sum(r[f"grad/{g}"] ** 2 for g in ("router", "proj", "gru", "experts", "other"))
        assert groups == pytest.approx(r["grad/all"] ** 2, rel=1e-6)
    gate = records[0]["L0/update_gate"]
    assert gate == pytest.approx(1 / (1 + math.exp(-2 * bias)), abs=0.02)


def test_resume_logs_each_step_once(data_cache, tiny_data, tmp_path):
    """A run killed after step 4 but before its checkpoint resumes from step 2; steps 3-4 are logged once."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(data_cache, run_dir, *RMOE, *HEALTH, "train.max_steps=4")
    single_process_trainer(cfg).fit()
    first = {r["step"]: r for r in read_metrics(run_dir, ROUTER_HEALTH_FILE)}
    shutil.rmtree(ckpt.step_dir(run_dir, 4))
    single_process_trainer(cfg, resume=True).fit()
    records = read_metrics(run_dir, ROUTER_HEALTH_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3]["grad/all"] == pytest.approx(first[4]["grad/all"], rel=1e-5)  # the same step, retrained


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["parallel.tensor_parallel=2"], r"logging.router_health: .*parallel.tensor_parallel=2 shards them"),
        (["parallel.pipeline_parallel=2"], r"logging.router_health: .*parallel.pipeline_parallel=2"),
        (["moe.gru_bias_init=nan"], r"moe.gru_bias_init: must be a finite number"),
    ],
)
def test_config_refuses(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, None, *RMOE, "logging.router_health=true", *extra)


def table(results: str) -> list[list[str]]:
    """The cells of every row of the router-health table."""
    section = results.split("## Router health over training", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| run | step | " + " | ".join(COLUMNS) + " |"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_sweep_collect_reports_router_health(data_cache, tiny_data, tmp_path):
    """`megamoe sweep --collect` with `reports: [router_health]`: seed-1 rows at steps 1, max/3 and max."""
    spec = {
        "name": "h", "out": str(tmp_path), "seeds": [1, 2], "reports": ["router_health"],
        "overrides": [*TINY, f"data.cache_dir={data_cache}", "logging.router_health=true", "train.max_steps=6"],
        "variants": {"rmoe": RMOE, "top2": [o for o in RMOE if "gru" not in o]},
    }  # fmt: skip
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(spec))
    for args in (("--parallel", "2"), ("--collect",)):
        res = cli("sweep", str(path), *args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr + res.stdout
    rows = table((tmp_path / "h" / "results.md").read_text())
    assert [r[:2] for r in rows] == [["rmoe-seed1", "1"], ["", "2"], ["", "6"], ["top2-seed1", "1"], ["", "2"],
                                     ["", "6"]]  # fmt: skip
    records = read_metrics(tmp_path / "h" / "rmoe-seed1", ROUTER_HEALTH_FILE)
    window = [r for r in records if 6 - WINDOW < r["step"] <= 6]
    for col, key in enumerate(COLUMNS, 2):  # the last row of rmoe: means over steps 2-6 (and over layers)
        values = [v for r in window for k, v in r.items() if k == key or k.endswith("/" + key)]
        assert rows[2][col] == f"{sum(values) / len(values):.3g}", key
    assert rows[3][COLUMNS.index("grad/proj") + 2] == "—" and rows[3][COLUMNS.index("h_sat") + 2] == "—"
    assert rows[3][COLUMNS.index("grad/router") + 2] != "—"
