"""Training on a sharded data cache reads the same batches as on the one-process cache: equal losses."""

from __future__ import annotations

from megamoe.train.metrics import read_metrics
from tests.util import single_process_trainer, tiny_config


def losses(run_dir) -> dict[int, float]:
    """Train and eval loss by step."""
    return {(r["step"], k): r[k] for r in read_metrics(run_dir) for k in ("train/loss", "eval/loss") if k in r}


def test_training_on_shards_equals_training_on_one_stream(data_cache, tmp_path):
    plain = tmp_path / "plain"
    single_process_trainer(tiny_config(data_cache, plain)).fit()
    sharded = tmp_path / "sharded"
    single_process_trainer(tiny_config(tmp_path / "cache", sharded, "data.shard_documents=5")).fit()
    expected = losses(plain)
    assert len(expected) == 8  # 6 train steps, 2 evaluations
    assert losses(sharded) == expected  # the same tokens in the same windows: bit-identical
