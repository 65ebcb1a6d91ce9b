"""`model.init_from` under tensor, expert and ZeRO data parallelism: the single-process run from the same source.

Each rank loads the dense source as one plain model, upcycles it at full shape (granularity 2: every
expert a slice of the dense FFN, with `moe.upcycle_noise`) and keeps its own slice, as init does
(megamoe/train/init_from.py). The layout's training then matches the single-process run started from
the same source, with the tolerances derived in tests/distributed/parity.py. A rank that kept
another rank's slice fails the first step's check (checked by planting one; see docs/interop.md).
"""

from __future__ import annotations

import pytest
import torch

from megamoe.train.export import load_run_model
from tests.distributed.parity import teacher_step
from tests.distributed.test_layouts import assert_layout_matches, launch_layouts
from tests.distributed.test_moe import make_reference
from tests.util import single_process_trainer, tiny_config

UPCYCLED = [
    "moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.renormalize=true", "moe.expert_hidden_size=64",
    "moe.balance_loss_coef=0.01", "moe.upcycle_noise=0.01",
]  # fmt: skip
"""Top-2 of 4 experts of width 64 from the tiny model's dense FFN of width 128 (granularity 2), dropless."""
COMMON = [
    "train.global_batch_size=8", "optim.grad_clip=0.5", "parallel.timeout_s=120",
    "train.checkpoint_interval=1", "train.keep_checkpoints=6", *UPCYCLED,
]  # fmt: skip
LAYOUTS = {
    "ep2-tp2-sp": (4, ["parallel.expert_parallel=2", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    "dp2-ep2-zero2": (4, ["parallel.expert_parallel=2", "parallel.zero_stage=2"]),
}
KEYS = ("train/loss", "train/grad_norm", "eval/loss", "moe/aux_loss", "moe/L1/balance")


@pytest.fixture(scope="module")
def source(data_cache, tiny_data, tmp_path_factory):
    """A dense run of 3 steps (seed 11): the checkpoint every run here starts from."""
    run_dir = tmp_path_factory.mktemp("init_from_source") / "dense"
    single_process_trainer(tiny_config(data_cache, run_dir, "train.max_steps=3", "train.seed=11")).fit()
    return run_dir


@pytest.fixture(scope="module")
def reference(data_cache, source, tmp_path_factory):
    """The single-process run started from the source."""
    return make_reference(data_cache, tmp_path_factory, "init_from", [*COMMON, f"model.init_from={source}"], KEYS)


@pytest.fixture(scope="module")
def runs(data_cache, source, tmp_path_factory) -> dict:
    """Every layout's run from the source, in one 4-rank world."""
    root = tmp_path_factory.mktemp("init_from_runs")
    return launch_layouts(LAYOUTS, data_cache, root, *COMMON, f"model.init_from={source}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_init_from_a_dense_run_matches_single_process(layout, reference, runs):
    assert_layout_matches(runs[layout], reference, KEYS)


def test_the_runs_start_from_the_source(reference, source):
    """The state every layout's first step is checked against: the source's weights, upcycled; zero moments.

    Without this, a layout and a reference that both ignored init_from would still agree."""
    dense, _ = load_run_model(source)
    before = teacher_step(reference["cfg"], None).before
    shared = {name: p for name, p in dense.named_parameters() if name in before.params}
    assert any("embed" in name for name in shared) and any("attn" in name for name in shared), list(shared)
    for name, p in shared.items():
        assert torch.equal(before.params[name], p.detach()), f"{name} is not the source's"
    experts = [name for name in before.params if name not in shared and "expert" in name]
    assert experts, list(before.params)
    assert all(float(m.abs().max()) == 0 for m in before.moments.values())
