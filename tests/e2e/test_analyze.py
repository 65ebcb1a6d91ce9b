"""`megamoe eval` and `megamoe analyze` on tiny trained runs (top-2 with capacity, and Lory)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from megamoe.analysis.record import Recording
from megamoe.train.metrics import read_metrics
from tests.e2e.test_train import cli
from tests.util import single_process_trainer, tiny_config

TOP2 = ["model.num_layers=3", "moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=1.0",
        "moe.eval_capacity_factor=1.0"]  # fmt: skip
LORY = ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8", "moe.dense_warmup_fraction=0"]


@pytest.fixture(scope="module")
def runs(data_cache, tiny_data, tmp_path_factory):
    """A top-2 run (checkpoints at steps 3 and 6) and a Lory run."""
    out = {}
    for name, overrides in (("top2", TOP2), ("lory", LORY)):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        single_process_trainer(tiny_config(data_cache, run_dir, *overrides)).fit()
        out[name] = run_dir
    return out


def rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_eval_matches_the_trainers_evaluation(runs, tmp_path):
    """On the trainer's own 4 val sequences, eval's loss is the logged final eval/loss; domains add up."""
    res = cli("eval", str(runs["top2"]), "--max-sequences", "4", "--batch-size", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    record = json.loads((runs["top2"] / "eval" / "step_6.json").read_text())
    logged = [r for r in read_metrics(runs["top2"]) if "eval/loss" in r][-1]["eval/loss"]
    overall, *domains = record["domains"]
    assert overall["domain"] == "all" and overall["tokens"] == 4 * 32 == record["sequences"] * record["seq_len"]
    assert overall["loss"] == pytest.approx(logged, rel=1e-4)
    assert sum(d["tokens"] for d in domains) == overall["tokens"]
    mean = sum(d["loss"] * d["tokens"] for d in domains) / overall["tokens"]
    assert mean == pytest.approx(overall["loss"], rel=1e-4)
    assert overall["ppl"] == pytest.approx(math.exp(overall["loss"]), rel=1e-4)
    assert "| all | 128 |" in res.stdout


def test_analyze_token_choice_run(runs, tmp_path):
    res = cli("analyze", str(runs["top2"]), "--checkpoints", "all", "--min-count", "4", "--max-sequences", "16",
              cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = runs["top2"] / "analysis"
    report = (out / "report.md").read_text()
    for section in ("Context-independent specialization", "Early routing learning", "Drop-towards-the-end",
                    "Router statistics"):  # fmt: skip
        assert section in report
    early = rows(out / "early_routing.csv")
    assert [int(r["step"]) for r in early] == [3, 6]
    assert float(early[1]["js_to_final"]) == 0.0 and float(early[1]["same_top_expert_as_final"]) == 1.0
    drops = rows(out / "drops_by_position.csv")
    assert sum(int(r["tokens"]) for r in drops) == 16 * 32
    assert all(float(r["dropped_first"]) <= float(r["dropped_any"]) for r in drops)
    assert [int(r["layer"]) for r in rows(out / "router_stats.csv")] == [0, 1, 2]
    assert {p.name for p in out.glob("routing_step_*.npz")} == {"routing_step_3.npz", "routing_step_6.npz"}


def test_analyze_other_documents(runs, tmp_path):
    """--data: documents the model never saw, tokenized with the run's tokenizer."""
    docs = tmp_path / "other.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) + "\n" for i in range(30)))
    res = cli("analyze", str(runs["top2"]), "--data", str(docs), "--min-count", "4", "--max-sequences", "6",
              "--out", str(tmp_path / "out"), cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "recorded step 6: 192 tokens" in res.stdout  # 6 sequences of 32
    assert f"of {docs} (95% of its documents)" in (tmp_path / "out" / "report.md").read_text()


def test_analyze_lory_run(runs, tmp_path):
    res = cli("analyze", str(runs["lory"]), "--min-count", "4", "--max-sequences", "8", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = runs["lory"] / "analysis"
    util = rows(out / "lory_utilization.csv")
    assert [int(r["layer"]) for r in util] == [0, 1]
    rec = Recording.load(next(out.glob("routing_step_*.npz")))
    for row in util:
        segment_SE = rec.layers[int(row["layer"])]["segment_SE"]
        assert int(row["segments"]) == len(segment_SE) == 8 * 4  # 8 sequences of 4 segments
        np.testing.assert_allclose(segment_SE.sum(1), 1.0, rtol=1e-5)
        assert int(row["experts_used"]) == int((segment_SE > 2 / 4).any(0).sum())
    assert (out / "lory_domain_L0.png").is_file() and "Not applicable" in (out / "report.md").read_text()


def test_analyze_and_eval_errors(runs, data_cache, tiny_data, tmp_path):
    res = cli("analyze", str(tmp_path / "nope"), cwd=tmp_path)
    assert res.returncode == 2 and "not a run directory" in res.stderr
    res = cli("analyze", str(runs["top2"]), "--layer", "7", cwd=tmp_path)
    assert res.returncode == 2 and "--layer 7: not a MoE layer (MoE layers: [0, 1, 2])" in res.stderr
    res = cli("eval", str(runs["top2"]), "--batch-size", "0", cwd=tmp_path)
    assert res.returncode == 2 and "--batch-size >= 1" in res.stderr
    dense = tmp_path / "dense"
    single_process_trainer(tiny_config(data_cache, dense, "train.max_steps=3")).fit()
    res = cli("analyze", str(dense), cwd=tmp_path)
    assert res.returncode == 2 and "a dense run (moe.routing: none) has no routing to analyse" in res.stderr
