"""Weighted blends (data.blend): the blend index and sampler as pure functions, preparation, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megamoe.config import config_to_dict, load_config, save_config
from megamoe.data import BlendSampler, PreparedBlend, SequenceSampler, prepare_data
from megamoe.data.blend import BlendPart, check_one_tokenizer
from megamoe.data.blend_sampler import CHUNK, BlendIndex
from megamoe.errors import ConfigError, DataError
from tests.util import blend_override, tiny_config, write_source

REPO = Path(__file__).resolve().parents[2]


def excess(weights: list[float], n: int) -> np.ndarray:
    """e_k(j) = c_k(j) − w_k·j after each of the first n positions (rows j = 1..n)."""
    index = BlendIndex(weights)
    source_N, _ = index.lookup(0, n)
    counts_NK = np.cumsum(np.eye(len(weights), dtype=np.int64)[source_N], axis=0)
    return counts_NK - np.outer(np.arange(1, n + 1), index.weights_K)


def check_bound(weights: list[float], n: int) -> None:
    """The derived bound: −(K−1)²/K ≤ c_k(n) − w_k·n ≤ 1 − 1/K, and |·| ≤ 1/2 for two sources."""
    k, e_NK = len(weights), excess(weights, n)
    assert e_NK.max() <= 1 - 1 / k + 1e-9, f"a source got {e_NK.max():.3f} samples ahead of its share"
    assert e_NK.min() >= -((k - 1) ** 2) / k - 1e-9, f"a source fell {-e_NK.min():.3f} samples behind"
    if k == 2:
        assert np.abs(e_NK).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("weights", [[3, 1], [1, 1], [0.5, 0.3, 0.2], [1, 2, 3, 4], [0.05, 0.1, 0.15, 0.3, 0.4]])
def test_realized_counts_stay_within_the_derived_bound(weights):
    check_bound(weights, 20_000)
    shares_K = BlendIndex(weights).counts(20_000) / 20_000
    k = len(weights)
    np.testing.assert_allclose(shares_K, np.asarray(weights) / sum(weights), rtol=0, atol=(k - 1) ** 2 / k / 20_000)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=10.0), min_size=2, max_size=6))
def test_bound_holds_for_any_weights(weights):
    check_bound(weights, 2_000)


def test_lookup_is_a_pure_function_of_position():
    """Any position, asked fresh (across chunk boundaries), gives what one pass from 0 gave; counts agree."""
    weights = [0.6, 0.3, 0.1]
    source_N, index_N = BlendIndex(weights).lookup(0, 2 * CHUNK + 10)
    for start, count in [(5, 3), (CHUNK - 4, 9), (2 * CHUNK + 1, 9), (0, 1)]:
        fresh_source, fresh_index = BlendIndex(weights).lookup(start, count)
        np.testing.assert_array_equal(fresh_source, source_N[start : start + count])
        np.testing.assert_array_equal(fresh_index, index_N[start : start + count])
    for n in (0, 7, CHUNK, CHUNK + 3):
        np.testing.assert_array_equal(BlendIndex(weights).counts(n), np.bincount(source_N[:n], minlength=3))
    for k in range(3):  # each source's samples are numbered 0, 1, 2, ... in stream order
        np.testing.assert_array_equal(index_N[source_N == k], np.arange(np.count_nonzero(source_N == k)))


SIZES, WEIGHTS, SEED = [7, 50, 23], [0.5, 0.3, 0.2], 11
"""Source 0 is far smaller than its share: it wraps into a new epoch every 14 positions."""


def test_same_step_same_batch_and_resume_equals_the_uninterrupted_stream():
    straight = BlendSampler(SIZES, WEIGHTS, SEED)
    stream = [np.concatenate(straight.micro_batches(step, 16, 0, 1, 4)) for step in range(12)]
    resumed = BlendSampler(SIZES, WEIGHTS, SEED)  # a restart knows only the step
    for step in (7, 11, 8):
        np.testing.assert_array_equal(np.concatenate(resumed.micro_batches(step, 16, 0, 1, 4)), stream[step])
    np.testing.assert_array_equal(np.concatenate(straight.micro_batches(3, 16, 0, 1, 4)), stream[3])
    assert not np.array_equal(
        stream[0], np.concatenate(BlendSampler(SIZES, WEIGHTS, SEED + 1).micro_batches(0, 16, 0, 1, 4))
    )


def test_global_batch_is_the_same_at_any_data_parallel_degree():
    sampler = BlendSampler(SIZES, WEIGHTS, SEED)
    for step in (0, 5, 123):
        single = np.concatenate(sampler.micro_batches(step, 16, 0, 1, 4))
        for dp in (2, 4):
            shards = [np.concatenate(sampler.micro_batches(step, 16, r, dp, 2)) for r in range(dp)]
            np.testing.assert_array_equal(np.concatenate(shards), single)


def assert_sources_read_their_own_streams(sampler: BlendSampler, positions: int) -> None:
    """Source k's samples, in stream order, are its own SequenceSampler stream from 0: every epoch whole."""
    ids = sampler.positions(0, positions)
    offsets_K = sampler.offsets_K
    for k, size in enumerate(SIZES):
        mine = ids[(ids >= offsets_K[k]) & (ids < offsets_K[k] + size)] - offsets_K[k]
        assert len(mine) == sampler.index.counts(positions)[k]
        np.testing.assert_array_equal(mine, SequenceSampler(size, SEED, stream=k + 1).positions(0, len(mine)))
        for epoch in range(len(mine) // size):
            assert sorted(mine[epoch * size : (epoch + 1) * size]) == list(range(size)), f"source {k} epoch {epoch}"


class GlobalPositionSampler(BlendSampler):
    """A planted bug: each source's stream is read at the global stream position, not at its own count."""

    def positions(self, start: int, count: int) -> np.ndarray:
        source_N, _ = self.index.lookup(start, count)
        out = np.empty(count, dtype=np.int64)
        for k, stream in enumerate(self.streams):
            for row in np.flatnonzero(source_N == k):
                out[row] = self.offsets_K[k] + stream.positions(start + int(row), 1)[0]
        return out


def test_each_source_keeps_its_own_stream_and_a_planted_bug_fails():
    assert_sources_read_their_own_streams(BlendSampler(SIZES, WEIGHTS, SEED), 400)
    with pytest.raises(AssertionError):
        assert_sources_read_their_own_streams(GlobalPositionSampler(SIZES, WEIGHTS, SEED), 400)


@pytest.mark.parametrize(
    ("blend", "match"),
    [
        ("[]", r"^data.blend: is empty"),
        ("[{path: a.jsonl, weight: 0}]", r"^data.blend\[0\].weight: must be a number > 0, got 0.0"),
        ("[{path: a.jsonl, weight: 1}, {path: b.jsonl, weight: -2}]", r"^data.blend\[1\].weight: must be a number > 0"),
        ("[{path: a.jsonl, weight: heavy}]", r"^data.blend\[0\].weight: expected float, got 'heavy'"),
        ("[{path: a.jsonl, weight: .nan}]", r"^data.blend\[0\].weight: must be a number > 0, got nan"),
        ("[{path: a.jsonl}]", r"^data.blend\[0\].weight: is required"),
        ("[{path: a.jsonl, wieght: 1}]", r"^data.blend\[0\].wieght: unknown key .*did you mean 'weight'"),
        ("[{path: a.jsonl, weight: 1}, {path: x/a.jsonl, weight: 1}]", r"^data.blend\[1\].name: 'a' already names"),
        ("[{path: a.jsonl, weight: 1, name: a b}]", r"^data.blend\[0\].name: 'a b' cannot name metrics"),
        ("[{path: a.jsonl, weight: 1, order: sorted}]", r"^data.blend\[0\].order: expected one of"),
        ("[a.jsonl]", r"^data.blend\[0\]: expected a mapping with keys path, weight"),
    ],
)
def test_bad_blend_config_is_one_error_naming_the_key(blend, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"data.blend={blend}"])


def test_blend_with_data_path_is_an_error():
    with pytest.raises(ConfigError, match=r"^data.blend: replaces data.path \('x.jsonl'\)"):
        load_config(None, ["data.path=x.jsonl", "data.blend=[{path: a.jsonl, weight: 1}]"])


def test_blend_config_round_trips_and_null_turns_it_off(tmp_path):
    cfg = load_config(
        None, ["data.blend=[{path: a.jsonl, weight: 3, order: similarity}, {path: b.jsonl, weight: 1}]", "train.name=x"]
    )
    assert [(s.label, s.weight, s.order) for s in cfg.data.blend] == [("a", 3.0, "similarity"), ("b", 1.0, "")]
    save_config(cfg, tmp_path / "config.yaml")
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(cfg)
    assert load_config(tmp_path / "config.yaml", ["data.blend=null"]).data.blend is None
    assert load_config().data.blend is None


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A folder with prose.jsonl and code.jsonl."""
    root = tmp_path_factory.mktemp("sources")
    write_source(root / "prose.jsonl", "prose")
    write_source(root / "code.jsonl", "code")
    return root


@pytest.fixture(scope="module")
def blend(sources, tmp_path_factory) -> PreparedBlend:
    """prose (weight 3) and code (weight 1), prepared with the tiny settings."""
    cache = tmp_path_factory.mktemp("blend_cache")
    cfg = tiny_config(cache, None, blend_override((sources / "prose.jsonl", 3), (sources / "code.jsonl", 1)))
    return prepare_data(cfg.data, progress=False)


def test_each_source_is_prepared_as_its_own_run_with_one_tokenizer(blend, sources):
    prose, code = blend.parts
    assert (prose.name, prose.weight, code.name, code.weight) == ("prose", 0.75, "code", 0.25)
    cache = prose.data.root.parent.parent
    alone = prepare_data(tiny_config(cache, None, f"data.path={sources / 'prose.jsonl'}").data, progress=False)
    assert alone.root == prose.data.root, "the first source's cache is a single-source run's cache"
    assert prose.data.manifest["tokenizer"]["trained"] and not code.data.manifest["tokenizer"]["trained"]
    assert code.data.manifest["settings"]["tokenizer"] == str(prose.data.tokenizer_path)
    assert blend.tokenizer_path == prose.data.tokenizer_path and blend.vocab_size == prose.data.vocab_size
    rows = {row["name"]: row for row in blend.manifest["blend"]}
    assert rows["code"]["train_tokens"] == len(code.data.split("train").tokens)
    assert rows["prose"]["weight"] == 0.75 and blend.domains == ["prose/prose", "code/code"]


def test_blended_split_reads_each_source_with_blend_domains(blend):
    train, seq_len = blend.split("train"), 32
    prose = blend.parts[0].data.split("train")
    first_code = prose.num_sequences(seq_len)
    assert train.num_sequences(seq_len) == first_code + blend.parts[1].data.split("train").num_sequences(seq_len)
    batch = train.batch(np.array([first_code + 2, 1, first_code]), seq_len)
    code_rows = blend.parts[1].data.split("train").batch(np.array([2, 0]), seq_len)
    np.testing.assert_array_equal(batch.tokens_BL[[0, 2]].numpy(), code_rows.tokens_BL.numpy())
    np.testing.assert_array_equal(batch.targets_BL[[0, 2]].numpy(), code_rows.targets_BL.numpy())
    np.testing.assert_array_equal(batch.tokens_BL[1].numpy(), prose.batch(np.array([1]), seq_len).tokens_BL[0].numpy())
    assert batch.domains_BL[[0, 2]].unique().tolist() == [1] and batch.domains_BL[1].unique().tolist() == [0]


def test_given_tokenizer_and_per_source_order(blend, sources, tmp_path):
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_bytes(blend.tokenizer_path.read_bytes())
    prose, code = sources / "prose.jsonl", sources / "code.jsonl"
    entries = f"[{{path: '{prose}', weight: 1}}, {{path: '{code}', weight: 1, order: similarity, name: py}}]"
    cfg = tiny_config(tmp_path / "cache", None, f"data.tokenizer={tokenizer}", f"data.blend={entries}")
    data = prepare_data(cfg.data, progress=False)
    assert [p.data.manifest["settings"]["order"] for p in data.parts] == ["random", "similarity"]
    assert [p.data.manifest["settings"]["tokenizer"] for p in data.parts] == [str(tokenizer)] * 2
    assert data.domains == ["prose/prose", "py/code"]


def test_missing_source_is_one_error_before_anything_is_prepared(sources, tmp_path):
    cfg = tiny_config(
        tmp_path / "cache", None, blend_override((sources / "prose.jsonl", 1), (tmp_path / "nope.jsonl", 1))
    )
    with pytest.raises(
        DataError, match=r"^data.blend\[1\]\.path \(nope\): no file or directory matches '.*nope.jsonl'$"
    ):
        prepare_data(cfg.data, progress=False)
    assert not (tmp_path / "cache" / "data").exists(), "no source may be prepared when another is missing"


def test_sources_with_different_tokenizers_are_one_error(sources, tmp_path):
    one = prepare_data(tiny_config(tmp_path, None, f"data.path={sources / 'prose.jsonl'}").data, progress=False)
    other = prepare_data(
        tiny_config(tmp_path, None, f"data.path={sources / 'code.jsonl'}", "data.vocab_size=300").data, progress=False
    )
    parts = [BlendPart("prose", 0.5, one), BlendPart("code", 0.5, other)]
    with pytest.raises(DataError, match=r"^data.blend\[1\] \(code\): packed with another tokenizer \(\d+ tokens"):
        check_one_tokenizer(parts)


def test_cli_error_is_one_line(sources, tmp_path):
    override = blend_override((sources / "prose.jsonl", 1), (tmp_path / "gone.jsonl", 2))
    res = subprocess.run(
        [sys.executable, "-m", "megamoe", "data", "prepare", override, f"data.cache_dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"megamoe: error: data.blend[1].path (gone): no file or directory matches '{tmp_path / 'gone.jsonl'}'"
    ]
