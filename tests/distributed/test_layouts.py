"""Every parallel layout trains exactly like the single-process run of the same global batch.

Each layout runs under torchrun (gloo, CPU) through the real CLI. Compared with the in-process
single-process reference over 6 optimizer steps: the train loss, the pre-clip gradient norm
(clipping at 0.5 is active on every step) and the eval loss at every logged step, and the final
parameters (read back from the layout's checkpoint into a single-process model).
Stated fp32 tolerance: relative 1e-5 for losses and norms, absolute 2e-6 for parameters
(reductions are summed in a different order on each layout).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megamoe.model import build_model
from megamoe.train.checkpoint import architecture, latest_checkpoint, load_checkpoint
from megamoe.train.engine import PlainEngine
from megamoe.train.run import load_run_config
from tests.distributed.helpers import check, metrics, torchrun
from tests.util import TINY, single_process_trainer, tiny_config

COMMON = ["train.global_batch_size=8", "optim.grad_clip=0.5", "parallel.timeout_s=120"]
LAYOUTS = {
    "tp2": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=0"]),
    "dp2": (2, ["parallel.zero_stage=0"]),
    "tp2-dp2": (4, ["parallel.tensor_parallel=2", "parallel.zero_stage=0"]),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "tp2-sp": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=0"]),
    "tp2-dp2-sp-zero1": (4, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"]),
}
KEYS = ("train/loss", "train/grad_norm", "eval/loss")


@pytest.fixture(scope="module")
def reference(data_cache, tiny_data, tmp_path_factory):
    """The single-process run: its metrics and final parameters."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    trainer = single_process_trainer(tiny_config(data_cache, run_dir, *COMMON))
    trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {"metrics": {k: metrics(run_dir, k) for k in KEYS}, "params": params}


def launch(nproc: int, data_cache, run_dir, *extra: str) -> None:
    """Train the tiny config on nproc ranks through `torchrun -m megamoe train` (later overrides win)."""
    args = [*TINY, *COMMON, f"data.cache_dir={data_cache}", f"train.run_dir={run_dir}", *extra]
    check(torchrun(nproc, "-m", "megamoe", "train", *args))


def assert_metrics_match(run_dir, reference: dict, from_step: int = 0, keys: tuple[str, ...] = KEYS) -> None:
    """Loss, grad norm and eval loss (or `keys`) equal the reference at every logged step > from_step."""
    for key in keys:
        got = [(s, v) for s, v in metrics(run_dir, key) if s > from_step]
        want = [(s, v) for s, v in reference["metrics"][key] if s > from_step]
        assert [s for s, _ in got] == [s for s, _ in want], key
        for (step, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-5), f"{key} at step {step}: {a} vs {b}"


def final_params(run_dir) -> dict[str, torch.Tensor]:
    """A run's newest checkpoint, resharded into a single-process model."""
    cfg = load_run_config(str(run_dir), [])
    model = build_model(cfg.model, 0, moe=cfg.moe)
    load_checkpoint(latest_checkpoint(run_dir), model, PlainEngine(model, cfg.optim, 1, False), architecture(cfg))
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, data_cache, tmp_path):
    nproc, overrides = LAYOUTS[name]
    run_dir = tmp_path / name
    launch(nproc, data_cache, run_dir, *overrides)
    assert_metrics_match(run_dir, reference)
    got = final_params(run_dir)
    for param, want in reference["params"].items():
        torch.testing.assert_close(got[param], want, rtol=0, atol=2e-6, msg=lambda m, p=param: f"{p}: {m}")


def test_reshard_on_resume(reference, data_cache, tmp_path):
    """Save at tp2×dp2 (ZeRO-1) after 3 steps; resume at dp4 (ZeRO-2) and at tp1 (one process): steps 4-6 match."""
    saved = tmp_path / "tp2dp2"
    launch(4, data_cache, saved, "parallel.tensor_parallel=2", "parallel.zero_stage=1", "train.max_steps=3")
    as_dp4, as_tp1 = tmp_path / "dp4", tmp_path / "tp1"
    shutil.copytree(saved, as_dp4)
    shutil.copytree(saved, as_tp1)
    resume = ["train.max_steps=6", "parallel.tensor_parallel=1", "parallel.zero_stage=2"]
    check(torchrun(4, "-m", "megamoe", "train", str(as_dp4), "--resume", *resume))
    assert_metrics_match(as_dp4, reference, from_step=3)
    cfg = load_run_config(str(as_tp1), ["train.max_steps=6", "parallel.tensor_parallel=1", "parallel.zero_stage=0"])
    single_process_trainer(cfg, resume=True).fit()
    assert_metrics_match(as_tp1, reference, from_step=3)
