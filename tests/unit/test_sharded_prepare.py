"""Sharded preparation (data.shard_documents) against the one-process preparation, at several worker counts.

The oracle is exact: the same documents, split, order and tokenizer, so the packed streams must be
equal token for token (np.array_equal), and two sharded runs with different worker counts must
write byte-identical caches. Windows that span two shards read as the one-process stream reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from megamoe.data import prepare_data
from megamoe.data.packed import ConcatArray
from megamoe.data.sharded import prepare_sharded, sharded_layout
from megamoe.errors import ConfigError
from tests.util import tiny_config

SHARD = 7
"""Documents per shard: 54 training documents make 8 shards, the last one smaller."""


def data_cfg(cache: Path, *extra: str):
    """The tiny corpus's data config (60 documents) with its own cache."""
    return tiny_config(cache, None, *extra).data


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the manifest without its cache_dir, which names the test folder)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest["config"]["cache_dir"] = ""
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def assert_same_stream(one, sharded) -> None:
    """Every split's tokens, domains, document offsets and ids are equal."""
    for name in ("train", "val"):
        a, b = one.split(name), sharded.split(name)
        assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)), name
        assert np.array_equal(np.asarray(a.domains), np.asarray(b.domains)), name
        assert np.array_equal(a.doc_offsets, b.doc_offsets), name
        assert np.array_equal(a.doc_ids, b.doc_ids), name


@pytest.mark.parametrize("order", ["random", "similarity"])
def test_sharded_equals_one_process_and_is_the_same_at_any_worker_count(tmp_path, order):
    one = prepare_data(data_cfg(tmp_path / "one", f"data.order={order}"), progress=False)
    runs = {}
    for workers in (1, 3):
        cfg = data_cfg(tmp_path / f"w{workers}", f"data.order={order}", f"data.shard_documents={SHARD}")
        runs[workers] = prepare_sharded(cfg, workers=workers, progress=False)
        assert runs[workers].manifest["shards"] == {"documents_per_shard": SHARD, "train": 8, "val": 1}
        assert not sharded_layout(cfg)[1].work.joinpath("tokens").exists(), "intermediates are removed"
    assert_same_stream(one, runs[1])
    assert tree_digest(runs[1].root) == tree_digest(runs[3].root)
    assert (one.root / "tokenizer.json").read_bytes() == (runs[1].root / "tokenizer.json").read_bytes()
    for field in ("splits", "domains", "documents", "train_documents", "unigram_val_ppl"):
        assert runs[1].manifest[field] == one.manifest[field], field
    if order == "similarity":
        report = {k: v for k, v in one.manifest["similarity"].items() if k != "seconds"}
        assert runs[1].manifest["similarity"] == report


def test_windows_across_shards_read_as_one_stream(tmp_path):
    one = prepare_data(data_cfg(tmp_path / "one"), progress=False)
    sharded = prepare_data(data_cfg(tmp_path / "sh", f"data.shard_documents={SHARD}"), progress=False)
    a, b = one.split("train"), sharded.split("train")
    assert a.num_sequences(32) == b.num_sequences(32)
    ids = np.arange(b.num_sequences(32))
    for x, y in zip(a.batch(ids, 32).__dict__.values(), b.batch(ids, 32).__dict__.values()):
        assert (x == y).all()


def test_concat_array_slices_match_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.integers(100, size=n) for n in (5, 1, 9, 3)]
    whole, concat = np.concatenate(parts), ConcatArray(parts)
    assert len(concat) == len(whole)
    for start in range(len(whole) + 1):
        for stop in range(start, len(whole) + 2):
            assert np.array_equal(concat[start:stop], whole[start:stop]), (start, stop)
    assert np.array_equal(np.asarray(concat), whole)


def test_a_finished_cache_is_reused_and_the_key_depends_on_the_shard_size(tmp_path):
    cfg = data_cfg(tmp_path, f"data.shard_documents={SHARD}")
    first = prepare_sharded(cfg, progress=False)
    stamp = (first.root / "manifest.json").stat().st_mtime_ns
    again = prepare_sharded(cfg, workers=2, progress=False)
    assert again.root == first.root and (again.root / "manifest.json").stat().st_mtime_ns == stamp
    other = dataclasses.replace(cfg, shard_documents=SHARD + 1)
    assert sharded_layout(other)[0] != sharded_layout(cfg)[0]
    assert sharded_layout(dataclasses.replace(cfg, shard_documents=0))[0] != sharded_layout(cfg)[0]


def test_bad_shard_size_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.shard_documents: must be >= 0"):
        data_cfg(tmp_path, "data.shard_documents=-1")
