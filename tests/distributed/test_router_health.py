"""logging.router_health under pure data parallel (torchrun, gloo): the records of the single-process run.

Gradient norms are of the DP-mean gradient and forward statistics are averaged over the ranks, so
each record matches the single-process run of the same global batch; only rank 0 writes.
"""

from __future__ import annotations

import pytest

from megamoe.train.metrics import ROUTER_HEALTH_FILE, read_metrics
from tests.distributed.helpers import check, torchrun
from tests.util import TINY, single_process_trainer, tiny_config

RMOE = ["moe.routing=topk", "moe.scorer=gru", "moe.num_experts=4", "moe.top_k=2", "moe.gru_hidden=8",
        "moe.capacity_factor=0", "moe.eval_capacity_factor=0"]  # fmt: skip
COMMON = [*RMOE, "logging.router_health=true", "train.global_batch_size=8", "train.max_steps=3",
          "train.eval_interval=0", "parallel.timeout_s=120"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(data_cache, tiny_data, tmp_path_factory):
    """The single-process run's records."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    single_process_trainer(tiny_config(data_cache, run_dir, *COMMON)).fit()
    return read_metrics(run_dir, ROUTER_HEALTH_FILE)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_data_parallel_records_match_single_process(reference, data_cache, tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    args = [*TINY, *COMMON, f"data.cache_dir={data_cache}", f"train.run_dir={run_dir}"]
    check(torchrun(2, "-m", "megamoe", "train", *args, f"parallel.zero_stage={zero_stage}"))
    records = read_metrics(run_dir, ROUTER_HEALTH_FILE)
    assert [r["step"] for r in records] == [1, 2, 3]  # rank 0 only
    for mine, single in zip(records, reference, strict=True):
        assert set(mine) == set(single)
        for key, value in single.items():
            assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (mine["step"], key)
