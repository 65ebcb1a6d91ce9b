"""aux_free in training (single process): the bias moves after each step, is logged, and resumes exactly."""

from __future__ import annotations

import shutil

import torch

from megamoe.analysis.bias import bias_trajectories
from megamoe.analysis.report import Report, _expert_bias
from megamoe.model.moe.balance import expert_biases
from megamoe.train.checkpoint import step_dir
from megamoe.train.export import export_run, load_exported
from megamoe.train.metrics import read_metrics
from megamoe.train.run import load_run_config
from tests.util import single_process_trainer, tiny_config

AUX_FREE = ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.score_fn=sigmoid", "moe.renormalize=true",
            "moe.balance=aux_free", "moe.bias_update_rate=0.05", "train.global_batch_size=8"]  # fmt: skip


def test_bias_trains_logs_and_resumes_exactly(data_cache, tiny_data, tmp_path):
    straight = single_process_trainer(tiny_config(data_cache, tmp_path / "run", *AUX_FREE))
    assert not any("expert_bias" in k for k in straight.engine.optimizer_state())  # not optimized, not decayed
    straight.fit()
    biases = {n: b.clone() for n, b in expert_biases(straight.model).items()}
    assert list(biases) == ["layers.0.ffn.expert_bias", "layers.1.ffn.expert_bias"]
    for bias in biases.values():  # six sign steps of 0.05: every entry a multiple of 0.05
        assert torch.allclose(bias / 0.05, (bias / 0.05).round(), atol=1e-5)
    rows = read_metrics(tmp_path / "run")
    logged = [[r[f"moe/L{i}/bias/e{e}"] for i in (0, 1) for e in range(4)] for r in rows if "moe/L1/bias/e0" in r]
    assert len(logged) == 6 and any(abs(v) > 0 for row in logged for v in row)
    assert logged[-1][4:] == biases["layers.1.ffn.expert_bias"].tolist()
    trajectories = bias_trajectories(tmp_path / "run")  # what megamoe analyze plots
    assert sorted(trajectories) == [0, 1] and trajectories[1][1].tolist() == [row[4:] for row in logged]
    report = Report(tmp_path)
    _expert_bias(report, tmp_path / "run")
    assert (tmp_path / "expert_bias_L0.png").is_file() and "## Expert bias" in "\n".join(report.lines)
    # resume from the step-3 checkpoint of a copy: the last three steps, the biases and weights are bitwise equal
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed_dir)
    for later in (4, 5, 6):
        shutil.rmtree(step_dir(resumed_dir, later), ignore_errors=True)
    resumed = single_process_trainer(load_run_config(str(resumed_dir), []), resume=True)
    assert resumed.step == 3 and any(b.abs().max() > 0 for b in expert_biases(resumed.model).values())
    resumed.fit()
    for name, bias in expert_biases(resumed.model).items():
        assert torch.equal(bias, biases[name]), name
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    # the export carries the bias: the exported model routes (and so predicts) exactly like the trained one
    exported = load_exported(export_run(tmp_path / "run", tmp_path / "export"))
    assert torch.equal(expert_biases(exported)["layers.1.ffn.expert_bias"], biases["layers.1.ffn.expert_bias"])
    tokens = torch.randint(
        0, exported.cfg.vocab_size, (2, exported.cfg.seq_len), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            exported(tokens).logits_BLV, straight.model.eval()(tokens).logits_BLV, rtol=0, atol=0
        )
