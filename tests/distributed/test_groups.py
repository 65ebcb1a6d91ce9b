"""Process groups: megatron-core and DeepSpeed agree; expert grads reduce over expert-DP; hangs fail fast."""

from __future__ import annotations

import json
import time

import pytest

from tests.distributed.helpers import check, torchrun


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Per-rank records of groups_world.py (tp2 × dp2, ep2 × edp2)."""
    out = tmp_path_factory.mktemp("groups")
    check(torchrun(4, "tests/distributed/worlds/groups_world.py", str(out)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def test_megatron_groups(world):
    """Rank order tp-cp-ep-dp-pp: TP neighbours, DP strided; experts fold EP × ETP × EDP over the world."""
    assert [w["megatron"]["tp"] for w in world] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [w["megatron"]["dp"] for w in world] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [w["megatron"]["ep"] for w in world] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [w["megatron"]["edp"] for w in world] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [w["megatron"]["etp"] for w in world] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("stage", ["0", "1", "2"])
def test_deepspeed_uses_megatron_groups(world, stage):
    for w in world:
        zero = w["zero"][stage]
        assert zero["ds_dp"] == w["megatron"]["dp"]
        assert zero["ds_edp"] == w["megatron"]["edp"]
        assert zero["ds_ep"] == w["megatron"]["ep"]


@pytest.mark.parametrize("stage", ["0", "1", "2"])
def test_expert_grads_reduce_over_expert_dp(world, stage):
    """Dense grads average over the DP group, expert grads over the expert-DP group."""
    for w in world:
        grad = w["zero"][stage]["grad"]
        dense = sum(r + 1 for r in w["megatron"]["dp"]) / len(w["megatron"]["dp"])
        expert = sum(10 * (r + 1) for r in w["megatron"]["edp"]) / len(w["megatron"]["edp"])
        assert grad["dense"] == pytest.approx([dense] * 4)
        assert grad["expert"] == pytest.approx([expert] * 4)


def test_shard_shape_factory_counts_match_real_tp(world):
    """The dry run's per-rank counts (no processes) equal the real tensor-parallel model's."""
    assert all(w["params_this_rank"] == w["params_shape_factory"] for w in world)


@pytest.mark.parametrize("mode", ["stuck", "crash"])
def test_a_bad_rank_fails_the_world_fast(mode):
    """A stuck rank trips the 5 s collective timeout; a crashed rank brings the world down."""
    start = time.perf_counter()
    res = torchrun(2, "tests/distributed/worlds/hang_world.py", mode, timeout=180)
    assert res.returncode != 0
    assert time.perf_counter() - start < 120
    expected = "rank 1 failed on purpose" if mode == "crash" else "imed out"
    assert expected in res.stdout + res.stderr
