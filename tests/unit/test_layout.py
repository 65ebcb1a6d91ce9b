"""Parallel layout validation: every bad layout is a ConfigError naming the keys and values."""

from __future__ import annotations

import pytest

from megamoe.config import load_config
from megamoe.errors import ConfigError
from megamoe.parallel.layout import resolve_layout


def layout(world: int, *overrides: str):
    """resolve_layout of the default config with overrides (vocab resolved to 4096)."""
    return resolve_layout(load_config(None, ["model.vocab_size=4096", *overrides]), world)


def test_good_layouts():
    lay = layout(4, "parallel.tensor_parallel=2")
    assert (lay.tp, lay.dp, lay.edp, lay.micro_batches, lay.describe()) == (2, 2, 4, 1, "tp2-dp2")
    lay = layout(4, "parallel.expert_parallel=2", "parallel.expert_tensor_parallel=2", "train.micro_batch_size=4")
    assert (lay.dp, lay.ep, lay.etp, lay.edp, lay.micro_batches) == (4, 2, 2, 1, 1)
    assert layout(1).micro_batches == 2


@pytest.mark.parametrize(
    ("world", "overrides", "match"),
    [
        (4, ["parallel.tensor_parallel=3"], r"parallel.tensor_parallel: \(3\) must divide the world size \(4\)"),
        (4, ["parallel.tensor_parallel=2", "parallel.data_parallel=4"],
         r"parallel.tensor_parallel \(2\) × parallel.data_parallel \(4\) = 8 must equal the world size \(4\)"),
        (8, ["parallel.tensor_parallel=8"],
         r"model.num_heads: \(4\) must be divisible by parallel.tensor_parallel \(8\)"),
        (4, ["parallel.tensor_parallel=4", "model.num_kv_heads=2"],
         r"model.num_kv_heads: \(2\) must be divisible by parallel.tensor_parallel \(4\)"),
        (2, ["parallel.tensor_parallel=2", "model.vocab_size=4097"],
         r"model.vocab_size: \(4097, padded\) must be divisible by parallel.tensor_parallel \(2\)"),
        (2, ["parallel.tensor_parallel=2", "model.ffn_hidden_size=701"],
         r"model.ffn_hidden_size: \(701\) must be divisible by parallel.tensor_parallel \(2\)"),
        (4, ["train.global_batch_size=16", "train.micro_batch_size=8"],
         r"train.global_batch_size: \(16\) must be a multiple of train.micro_batch_size \(8\) "
         r"× data-parallel degree \(4\) = 32"),
        (4, ["parallel.expert_parallel=3"],
         r"parallel.expert_parallel: parallel.expert_parallel \(3\) × parallel.expert_tensor_parallel \(1\) = 3"),
        (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "model.seq_len=255"],
         r"model.seq_len: \(255\) must be divisible by parallel.tensor_parallel \(2\)"),
        (1, ["parallel.tensor_parallel=2"], r"need several processes, but this is a single one: launch with `torchrun"),
    ],
)  # fmt: skip
def test_bad_layouts(world, overrides, match):
    with pytest.raises(ConfigError, match=match):
        layout(world, *overrides)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: needs parallel.tensor_parallel > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])


def test_zero_stage_choices():
    with pytest.raises(ConfigError, match=r"parallel.zero_stage: expected one of 0, 1, 2, got 3"):
        load_config(None, ["parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"parallel.zero_stage: expected one of 0, 1, 2, got True"):
        load_config(None, ["parallel.zero_stage=true"])


PIPE = ["parallel.pipeline_parallel=2", "parallel.zero_stage=0"]


def test_good_pipeline_layouts():
    lay = layout(8, *PIPE, "parallel.tensor_parallel=2", "train.global_batch_size=16", "train.micro_batch_size=2")
    assert (lay.pp, lay.tp, lay.dp, lay.micro_batches, lay.describe()) == (2, 2, 2, 4, "pp2-tp2-dp2")
    lay = layout(4, *PIPE, "parallel.expert_parallel=2", "moe.routing=topk", "train.global_batch_size=8",
                 "train.micro_batch_size=2")  # fmt: skip
    assert (lay.dp, lay.ep, lay.edp) == (2, 2, 1)
    lay = layout(2, *PIPE, "parallel.pipeline_schedule=interleaved_1f1b", "parallel.virtual_stages=2",
                 "train.global_batch_size=8", "train.micro_batch_size=2")  # fmt: skip
    assert lay.describe() == "pp2v2-tp1-dp1"


def test_balanced_split_counts_embedding_and_head():
    """A big vocabulary pushes blocks away from the first and last chunk."""
    from megamoe.parallel.stages import split_layers

    cfg = load_config(None, ["model.vocab_size=65536", "model.num_layers=8", "model.d_model=64", "model.num_heads=4"])
    sizes = [stop - start for start, stop in split_layers(cfg, 4)]
    assert sum(sizes) == 8 and sizes[0] < sizes[1] and sizes[-1] < sizes[-2], sizes
    even = load_config(None, ["model.vocab_size=64", "model.num_layers=8"])
    assert [b - a for a, b in split_layers(even, 4)] == [2, 2, 2, 2]


@pytest.mark.parametrize(
    ("world", "overrides", "match"),
    [
        (2, ["parallel.pipeline_parallel=2"], r"parallel.zero_stage: \(1\) must be 0 with parallel.pipeline_parallel"),
        (4, [*PIPE, "parallel.tensor_parallel=3"],
         r"parallel.tensor_parallel: parallel.tensor_parallel \(3\) × parallel.pipeline_parallel \(2\) must divide"),
        (2, [*PIPE, "train.global_batch_size=2", "train.micro_batch_size=2"],
         r"train.global_batch_size: gives 1 pipeline micro-batches per data-parallel rank; the pipeline needs at "
         r"least parallel.pipeline_parallel \(2\)"),
        (2, [*PIPE, "parallel.pipeline_split=1,2"], r"parallel.pipeline_split: '1,2' must list 2 block counts"),
        (2, [*PIPE, "parallel.pipeline_split=a,b"], r"parallel.pipeline_split: must be comma-separated block counts"),
        (2, [*PIPE, "model.num_layers=1"], r"parallel.pipeline_parallel: × parallel.virtual_stages = 2 pipeline "
                                            r"chunks, more than model.num_layers \(1\)"),
        (2, [*PIPE, "train.pipeline_microbatches=3"], r"train.pipeline_microbatches: \(3\) must equal"),
        (2, [*PIPE, "parallel.pipeline_schedule=interleaved_1f1b", "parallel.virtual_stages=2",
             "train.global_batch_size=6", "train.micro_batch_size=2"],
         r"interleaved 1F1B needs a multiple of parallel.pipeline_parallel"),
    ],
)  # fmt: skip
def test_bad_pipeline_layouts(world, overrides, match):
    with pytest.raises(ConfigError, match=match):
        layout(world, *overrides)


def test_virtual_stages_need_interleaving():
    with pytest.raises(ConfigError, match=r"parallel.virtual_stages: \(2\) > 1 needs parallel.pipeline_schedule"):
        load_config(None, ["parallel.virtual_stages=2"])
