"""Lory end to end: dense warm-up, upcycling (continuity, optimizer state, resume across the switch),
routing metrics and the per-domain routing table."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from megamoe.train.checkpoint import step_dir
from megamoe.train.metrics import read_metrics
from megamoe.train.upcycle import upcycle
from tests.util import single_process_trainer, tiny_config

LORY = ["moe.routing=lory", "moe.num_experts=4", "moe.moe_every=1", "moe.segment_length=8"]


def trainer(cache, run_dir, *extra: str, resume: bool = False):
    """A single-process Lory trainer on the tiny corpus (4 segments of 8 tokens per sequence)."""
    return single_process_trainer(tiny_config(cache, run_dir, *LORY, *extra), resume)


def test_upcycling_keeps_the_loss_and_copies_the_dense_ffn(data_cache, tiny_data, tmp_path):
    """At the switch: same loss on a fixed batch, experts (and their moments) = expert 0, fresh router."""
    t = trainer(data_cache, tmp_path, "moe.dense_warmup_fraction=0.5")
    for _ in range(t.dense_steps):
        t.train_step()
    tokens, targets = t._batch(t.train_split, [0, 1])
    before = t.model(tokens, targets).loss
    router = t.model.layers[0].ffn.scorer.router.weight.detach().clone()
    upcycle(t.model, t.engine, t.cfg, t.step)
    t.model.set_dense_phase(False)
    out = t.model(tokens, targets)
    torch.testing.assert_close(out.loss, before, rtol=1e-6, atol=1e-6)
    assert out.moe[0].segment_weights.max() < 0.999, "the fresh router is not one-hot"
    state = t.engine.optimizer_state()
    for name, param in t.model.named_parameters():
        if ".experts." in name:
            assert torch.equal(param, param[:1].expand_as(param)), name
            moments = state[f"{name}.exp_avg_sq"]
            assert moments[0].abs().sum() > 0 and torch.equal(moments, moments[:1].expand_as(moments))
        if ".scorer." in name:
            assert torch.count_nonzero(state[f"{name}.exp_avg"]) == 0
    assert not torch.allclose(t.model.layers[0].ffn.scorer.router.weight, router)


@pytest.mark.parametrize(("fraction", "checkpoint"), [("0.5", 3), ("0.34", 3)])
def test_resume_across_the_switch(data_cache, tiny_data, tmp_path, fraction, checkpoint):
    """Resume from a checkpoint at the switch (W = 3) or after it (W = 2): same as the straight run."""
    straight = trainer(data_cache, tmp_path / "a", f"moe.dense_warmup_fraction={fraction}")
    assert straight.dense_steps == (3 if fraction == "0.5" else 2)
    straight.fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(step_dir(tmp_path / "b", 6))
    resumed = trainer(data_cache, tmp_path / "b", f"moe.dense_warmup_fraction={fraction}", resume=True)
    assert resumed.step == checkpoint
    resumed.fit()
    final = straight.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, final[name]), name
    logged = [
        [r["train/loss"] for r in read_metrics(run) if "train/loss" in r] for run in (tmp_path / "a", tmp_path / "b")
    ]
    assert logged[0] == logged[1] and len(logged[0]) == 6


def test_routing_metrics_and_domain_table(data_cache, tiny_data, tmp_path):
    summary = trainer(data_cache, tmp_path, "moe.dense_warmup_fraction=0").fit()
    assert math.isfinite(summary["eval/loss"])
    logged = [r for r in read_metrics(tmp_path) if "train/loss" in r][-1]
    for layer in (0, 1):
        assert 0 <= logged[f"moe/L{layer}/utilization"] <= 1  # near-uniform at first: 0 by the 2/E rule
        assert logged[f"moe/L{layer}/entropy"] > 0
        assert logged[f"moe/L{layer}/drop"] == 0 and logged[f"moe/L{layer}/balance"] == 0
        assert 0 <= summary[f"eval/routing/L{layer}/domain_js"] <= math.log(4)
    records = [json.loads(line) for line in (tmp_path / "routing_domains.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    for table in (records[-1]["L0"], records[-1]["L1"]):
        assert len(table) >= 2, "the tiny corpus has several domains"
        for weights in table.values():
            assert len(weights) == 4 and sum(weights) == pytest.approx(1, abs=1e-5)


def test_cli_generate_from_export_and_run_dir(data_cache, tiny_data, tmp_path):
    """`megamoe generate`: a run directory and its export produce the same greedy text; bad prompts fail clearly."""
    from megamoe.train.export import export_run
    from tests.e2e.test_train import cli

    run = tmp_path / "run"
    trainer(data_cache, run, "moe.dense_warmup_fraction=0").fit()
    export_run(run, tmp_path / "export")
    args = ["--prompt", "def main(", "--max-new-tokens", "12", "--temperature", "0"]
    texts = []
    for where in (run, tmp_path / "export"):
        res = cli("generate", str(where), *args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("def main(") and len(res.stdout) > len("def main(\n")
        texts.append(res.stdout)
    assert texts[0] == texts[1]
    sampled = cli(
        "generate", str(run), "--prompt", "import", "--num-samples", "2", "--routing", "segment", cwd=tmp_path
    )
    assert sampled.returncode == 0 and sampled.stdout.count("--- sample") == 2, sampled.stderr
    res = cli("generate", str(run), "--prompt", "x = 1\n" * 40, cwd=tmp_path)
    assert res.returncode == 2 and "model.seq_len - 1" in res.stderr
