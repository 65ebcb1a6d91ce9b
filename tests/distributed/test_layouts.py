"""Every parallel layout trains exactly like the single-process run of the same global batch.

Each layout runs under torchrun (gloo, CPU) through the real CLI, 6 optimizer steps with clipping at
0.5 active on every step and a checkpoint after every step. tests/distributed/parity.py compares it
with single-process math: every step from the layout's own previous state (loss, grad norm, the
per-tensor gradient, the second moment, and the AdamW update, each with a derived fp32 tolerance),
and along the trajectory (losses, grad norms, eval losses, final parameters).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from megamoe.train.checkpoint import step_dir
from megamoe.train.run import load_run_config
from tests.distributed.helpers import TIMEOUT_S, check, metrics, torchrun
from tests.distributed.parity import (
    check_every_step,
    check_final,
    check_step,
    check_trajectory,
    read_state,
    teacher_step,
)
from tests.util import TINY, single_process_trainer, tiny_config

COMMON = [
    "train.global_batch_size=8", "optim.grad_clip=0.5", "parallel.timeout_s=120",
    "train.checkpoint_interval=1", "train.keep_checkpoints=6",
]  # fmt: skip
LAYOUTS = {
    "tp2": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=0"]),
    "dp2": (2, ["parallel.zero_stage=0"]),
    "tp2-dp2": (4, ["parallel.tensor_parallel=2", "parallel.zero_stage=0"]),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "tp2-sp": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=0"]),
    "tp2-dp2-sp-zero1": (4, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"]),
    "tp2-dp2-zero2-full": (4, ["parallel.tensor_parallel=2", "parallel.zero_stage=2", "train.recompute=full"]),
    # the head fused with the loss, 40 tokens at a time (uneven chunks), vocab-parallel over the gathered sequence
    "tp2-sp-fused-loss": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=0",
                              "train.loss_chunk_tokens=40"]),
}  # fmt: skip
KEYS = ("train/loss", "train/grad_norm", "eval/loss")


@pytest.fixture(scope="module")
def reference(data_cache, tiny_data, tmp_path_factory):
    """The single-process run: its metrics and final parameters, and the config teacher steps use."""
    root = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(data_cache, root / "run", *COMMON)
    trainer = single_process_trainer(cfg)
    trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    teacher = tiny_config(data_cache, root / "teacher", *COMMON)
    return {"metrics": {k: metrics(root / "run", k) for k in KEYS}, "params": params, "cfg": teacher}


def launch(nproc: int, data_cache, run_dir, *extra: str, env: dict | None = None) -> None:
    """Train the tiny config on nproc ranks through `torchrun -m megamoe train` (later overrides win)."""
    check(torchrun(nproc, "-m", "megamoe", "train", *_train_args(data_cache, run_dir, extra), env=env))


def _train_args(data_cache, run_dir, extra) -> list[str]:
    """The tiny config's `megamoe train` overrides for one run (later overrides win)."""
    return [*TINY, *COMMON, f"data.cache_dir={data_cache}", f"train.run_dir={run_dir}", *extra]


def launch_layouts(layouts: dict[str, tuple[int, list[str]]], data_cache, root, *common: str) -> dict:
    """Train every layout (common + its overrides) under root/<name>: one world per rank count; their run dirs."""
    for nproc in sorted({n for n, _ in layouts.values()}):
        runs = {root / name: [*common, *extra] for name, (n, extra) in layouts.items() if n == nproc}
        launch_world(nproc, data_cache, runs)
    return {name: root / name for name in layouts}


def launch_world(nproc: int, data_cache, runs: dict, env: dict | None = None) -> None:
    """Train several tiny configs ({run_dir: overrides}) one after another in one torchrun world (train_world.py)."""
    first = next(iter(runs))
    spec = first.parent / f"world-{nproc}-{first.name}.json"
    spec.write_text(json.dumps([_train_args(data_cache, run_dir, extra) for run_dir, extra in runs.items()]))
    timeout = TIMEOUT_S + 60 * len(runs)
    check(torchrun(nproc, "tests/distributed/worlds/train_world.py", str(spec), env=env, timeout=timeout))


def assert_layout_matches(run_dir, reference: dict, keys: tuple[str, ...] = KEYS) -> None:
    """Every step from the layout's own state, the trajectory's metrics, and the final parameters."""
    check_every_step(run_dir, reference["cfg"])
    check_trajectory(run_dir, reference, keys)
    check_final(run_dir, reference, reference["cfg"])


@pytest.fixture(scope="module")
def layout_runs(data_cache, tiny_data, tmp_path_factory) -> dict:
    """Every layout's run dir, trained in one world per rank count."""
    return launch_layouts(LAYOUTS, data_cache, tmp_path_factory.mktemp("layouts"))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, layout_runs):
    assert_layout_matches(layout_runs[name], reference)


PLANTED = """# A planted layout bug: the sequence-parallel RMSNorm scales lose their gradient's TP all-reduce.
import megamoe.parallel.specs as specs

specs.SequenceParallelRMSNorm.scale = lambda self: self.weight
"""


def test_planted_bug_fails(reference, data_cache, tmp_path):
    """The checks are strict enough: tp2-sp with the norm-scale gradient all-reduce dropped fails them."""
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "sitecustomize.py").write_text(PLANTED)
    env = {"PYTHONPATH": f"{tmp_path / 'plant'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run_dir = tmp_path / "tp2-sp-planted"
    nproc, overrides = LAYOUTS["tp2-sp"]
    launch(nproc, data_cache, run_dir, *overrides, env=env)
    with pytest.raises(AssertionError, match=r"step 1 \S+: gradient differs"):
        check_every_step(run_dir, reference["cfg"])
    # The first tensor in order (the embedding) already fails, by ~6x its tolerance, because the unsummed
    # scales skew each TP rank's clipping norm; the scales themselves are off by about half their gradient.
    teacher, layout = teacher_step(reference["cfg"], None), read_state(run_dir, step_dir(run_dir, 1))
    with pytest.raises(AssertionError, match=r"attn_norm\.weight: gradient differs by (\S+) \(allowed") as failed:
        check_step("layers.0.attn_norm.weight", 1, layout, teacher, reference["cfg"])
    err, allowed = (float(x) for x in re.findall(r"by (\S+) \(allowed (\S+),", str(failed.value))[0])
    assert err > 100 * allowed


def test_reshard_on_resume(reference, data_cache, tmp_path):
    """Save at tp2×dp2 (ZeRO-1) after 3 steps; resume at dp4 (ZeRO-2) and at tp1 (one process): steps 4-6 match."""
    saved = tmp_path / "tp2dp2"
    launch(4, data_cache, saved, "parallel.tensor_parallel=2", "parallel.zero_stage=1", "train.max_steps=3")
    as_dp4, as_tp1 = tmp_path / "dp4", tmp_path / "tp1"
    shutil.copytree(saved, as_dp4)
    shutil.copytree(saved, as_tp1)
    resume = ["train.max_steps=6", "parallel.tensor_parallel=1", "parallel.zero_stage=2"]
    check(torchrun(4, "-m", "megamoe", "train", str(as_dp4), "--resume", *resume))
    check_trajectory(as_dp4, reference, KEYS, from_step=3)
    cfg = load_run_config(str(as_tp1), ["train.max_steps=6", "parallel.tensor_parallel=1", "parallel.zero_stage=0"])
    single_process_trainer(cfg, resume=True).fit()
    check_trajectory(as_tp1, reference, KEYS, from_step=3)
