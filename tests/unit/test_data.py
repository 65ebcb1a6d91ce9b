"""Data: packing round trip, split coverage, caching, sources, sampler, bad input."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest

from megamoe.config import load_config
from megamoe.data import SequenceSampler, prepare_data
from megamoe.data.corpus import embedded_files, load_documents
from megamoe.data.prepare import cache_key
from megamoe.data.tokenizer import load_tokenizer
from megamoe.errors import DataError
from tests.util import tiny_config


def test_embedded_corpus_is_the_stdlib():
    files = embedded_files()
    assert len(files) > 1000
    domains = {d for _, d in files}
    assert {"json", "email", "asyncio", "toplevel"} <= domains
    assert all(p.suffix == ".py" for p, _ in files)


def test_round_trip_and_exactly_once(tiny_data, data_cache):
    """Decoding a packed document gives its text; every used document is packed exactly once."""
    cfg = tiny_config(data_cache).data
    docs = load_documents(cfg, Path(cfg.cache_dir) / "hf")
    tok = load_tokenizer(tiny_data.tokenizer_path)
    eod = tiny_data.manifest["tokenizer"]["eod_id"]
    seen: list[int] = []
    for name in ("train", "val"):
        split = tiny_data.split(name)
        assert split.doc_offsets[-1] == len(split.tokens) == tiny_data.manifest["splits"][name]["tokens"]
        ends = split.tokens[split.doc_offsets[1:] - 1]
        assert np.all(ends == eod), "every document ends with EOD"
        for i, doc_id in enumerate(split.doc_ids):
            assert tok.decode(split.document(i).tolist(), skip_special_tokens=False) == docs[int(doc_id)]["text"]
            domain = tiny_data.domains[int(split.domains[split.doc_offsets[i]])]
            assert domain == docs[int(doc_id)]["domain"]
        seen += split.doc_ids.tolist()
    assert len(seen) == len(set(seen)) == tiny_data.manifest["documents"]["used"] == 60
    assert set(tiny_data.split("train").doc_ids).isdisjoint(tiny_data.split("val").doc_ids)


def test_batches_are_shifted_windows(tiny_data):
    split = tiny_data.split("train")
    batch = split.batch(np.array([0, 3]), 32)
    assert batch.tokens_BL.shape == batch.targets_BL.shape == (2, 32)
    np.testing.assert_array_equal(batch.tokens_BL[1].numpy(), split.tokens[96:128])
    np.testing.assert_array_equal(batch.targets_BL[1].numpy(), split.tokens[97:129])
    np.testing.assert_array_equal(batch.domains_BL[1].numpy(), split.domains[97:129])


def test_cache_is_reused_and_keyed(tiny_data, data_cache):
    cfg = tiny_config(data_cache).data
    stamp = (tiny_data.root / "manifest.json").stat().st_mtime_ns
    again = prepare_data(cfg, progress=False)
    assert again.root == tiny_data.root
    assert (again.root / "manifest.json").stat().st_mtime_ns == stamp, "the second run must not rebuild"
    changed = tiny_config(data_cache, None, "data.seed=7").data
    assert cache_key(changed) != cache_key(cfg)
    assert cache_key(tiny_config(data_cache, None, "data.cache_dir=/elsewhere").data) == cache_key(cfg)


def test_unigram_baseline_is_recorded(tiny_data):
    ppl = tiny_data.manifest["unigram_val_ppl"]
    assert 1.0 < ppl < 512


def test_jsonl_source_with_domains_and_empty_docs(tmp_path):
    rows = [{"body": f"document number {i} " * (i + 1), "src": "a" if i % 2 else "b"} for i in range(12)]
    rows.append({"body": "   ", "src": "a"})
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"data.path={path}",
            "data.text_field=body",
            "data.domain_field=src",
            "data.vocab_size=300",
            f"data.cache_dir={tmp_path / 'c'}",
            "data.val_fraction=0.2",
        ],
    ).data
    data = prepare_data(cfg, progress=False)
    assert data.domains == ["a", "b"]
    assert data.manifest["documents"] == {"total": 13, "empty_skipped": 1, "used": 12}
    assert data.manifest["splits"]["val"]["documents"] == 2


def test_text_files_and_saved_dataset(tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.txt").write_text(f"the {name} file\nhas two lines\n")
    cfg = load_config(
        None, [f"data.path={tmp_path}/*.txt", "data.vocab_size=300", f"data.cache_dir={tmp_path / 'c'}"]
    ).data
    data = prepare_data(cfg, progress=False)
    assert data.domains == ["alpha", "beta"] and data.manifest["documents"]["used"] == 2
    datasets.Dataset.from_dict({"text": ["one doc", "two doc", "red doc"]}).save_to_disk(str(tmp_path / "saved"))
    cfg = load_config(
        None, [f"data.path={tmp_path / 'saved'}", "data.vocab_size=300", f"data.cache_dir={tmp_path / 'c'}"]
    ).data
    assert prepare_data(cfg, progress=False).manifest["documents"]["used"] == 3


def test_given_tokenizer_is_used(tmp_path, tiny_data):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}(): return {i}"}) + "\n" for i in range(5)))
    cfg = load_config(
        None, [f"data.path={path}", f"data.tokenizer={tiny_data.tokenizer_path}", f"data.cache_dir={tmp_path / 'c'}"]
    ).data
    data = prepare_data(cfg, progress=False)
    assert data.vocab_size == tiny_data.vocab_size and data.manifest["tokenizer"]["trained"] is False


@pytest.mark.parametrize(
    ("setup", "overrides", "match"),
    [
        (None, ["data.path={tmp}/missing.jsonl"], r"data.path: no file or directory matches '.*missing.jsonl'"),
        ("empty", ["data.path={tmp}/empty.jsonl"], r"data.path: file .*empty.jsonl is empty"),
        (
            "wrong_field",
            ["data.path={tmp}/wrong.jsonl"],
            r"data.text_field: no column 'text' in .*wrong.jsonl \(columns: \['content'\]\)",
        ),
        (
            "wrong_field",
            ["data.path={tmp}/wrong.jsonl", "data.text_field=content", "data.domain_field=lang"],
            r"data.domain_field: no column 'lang'",
        ),
        (
            "one_doc",
            ["data.path={tmp}/one.jsonl"],
            r"data.path: .*one.jsonl has 1 usable non-empty documents; need at least 2",
        ),
        ("odd_ext", ["data.path={tmp}/corpus.dat"], r"data.format: cannot tell the format of .*corpus.dat"),
        ("numbers", ["data.path={tmp}/nums.jsonl"], r"data.path: .*nums.jsonl:1: 'text' is a number \(1\); expected a"),
        (None, ["data.tokenizer={tmp}/nope.json"], r"data.tokenizer: tokenizer file .*nope.json not found"),
        ("bad_tok", ["data.tokenizer={tmp}/tok.json"], r"data.tokenizer: .*tok.json is not a valid tokenizer.json"),
    ],
)
def test_bad_data_input(tmp_path, setup, overrides, match):
    files = {
        "empty": ("empty.jsonl", ""),
        "wrong_field": ("wrong.jsonl", '{"content": "x y z"}\n{"content": "a b"}\n'),
        "one_doc": ("one.jsonl", '{"text": "only one"}\n{"text": ""}\n'),
        "odd_ext": ("corpus.dat", "hello"),
        "numbers": ("nums.jsonl", '{"text": 1}\n{"text": 2}\n'),
        "bad_tok": ("tok.json", "{not json"),
    }
    if setup:
        name, text = files[setup]
        (tmp_path / name).write_text(text)
    cache = tmp_path / "cache"
    cfg = load_config(None, [o.format(tmp=tmp_path) for o in overrides] + [f"data.cache_dir={cache}"])
    with pytest.raises(DataError, match=match):
        prepare_data(cfg.data, progress=False)
    data_dir = cache / "data"
    leftovers = [p.name for p in data_dir.iterdir() if not p.name.endswith(".lock")] if data_dir.exists() else []
    assert leftovers == [], "a failed prepare must leave nothing behind"


def test_sampler_epochs_and_resumability():
    sampler = SequenceSampler(10, seed=3)
    first_epoch = sampler.positions(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert not np.array_equal(sampler.positions(10, 10), first_epoch)  # a new permutation per epoch
    fresh = SequenceSampler(10, seed=3)
    np.testing.assert_array_equal(fresh.positions(13, 4), sampler.positions(13, 4))


def test_sampler_global_batch_is_layout_independent():
    """The union of all DP ranks' micro-batches of a step is the same global batch at any DP degree."""
    sampler = SequenceSampler(1000, seed=0)
    for step in (0, 5, 123):
        single = np.concatenate(sampler.micro_batches(step, 16, 0, 1, 4))
        for dp in (2, 4):
            shards = [np.concatenate(sampler.micro_batches(step, 16, r, dp, 2)) for r in range(dp)]
            np.testing.assert_array_equal(np.concatenate(shards), single)


@pytest.mark.parametrize("order", ["random", "similarity"])
def test_concurrent_prepare_builds_once(tmp_path, order):
    """Two processes (ranks) preparing the same data: one builds, the other waits and reuses it."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i} " * 50}) + "\n" for i in range(40)))
    code = (
        "import sys; from megamoe.config import load_config; from megamoe.data import prepare_data;"
        f"cfg = load_config(None, ['data.path={path}', 'data.vocab_size=300', 'data.cache_dir={tmp_path / 'c'}',"
        f" 'data.order={order}']);"
        "print(prepare_data(cfg.data, progress=False).root)"
    )
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        for _ in range(2)
    ]
    roots = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(roots) == 1
    entries = [p for p in (tmp_path / "c" / "data").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1


@pytest.mark.parametrize(
    ("name", "text", "extra", "match"),
    [
        (
            "x.jsonl",
            '{"text": "a b"}\n{"text": "c d" "x": 1}\n',
            [],
            r"^data.path: \S*x.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 16\)$",
        ),
        ("x.jsonl", '{"text": "a b"}\n\n[1, 2]\n', [], r"x.jsonl:3: not a JSON object \(found an array \[1, 2\]\)"),
        ("x.jsonl", '{"text": "a b"}\n"just text"\n', [], r"x.jsonl:2: not a JSON object \(found a string"),
        (
            "x.jsonl",
            '{"text": "a b"}\n{"body": "c"}\n',
            [],
            r"x.jsonl:2: no 'text' field \(data.text_field; fields here: 'body'\)",
        ),
        ("x.jsonl", '{"text": "a b"}\n{"text": null}\n', [], r"x.jsonl:2: 'text' is null; expected a string"),
        (
            "x.jsonl",
            '{"text": "a b"}\n{"text": "c"}\n{"text": 7}\n',
            [],
            r"x.jsonl:3: 'text' is a number \(7\); expected a string",
        ),
        (
            "x.jsonl",
            '{"text": "a", "d": "x"}\n{"text": "b"}\n',
            ["data.domain_field=d"],
            r"x.jsonl:2: no 'd' field \(data.domain_field",
        ),
        (
            "x.json",
            '[{"text": "a"},\n {"text": "b"} {"text": "c"}]\n',
            [],
            r"x.json:2: not valid JSON \(Expecting ',' delimiter at column 16\)",
        ),
        (
            "x.json",
            '[{"text": "a"}, {"text": "b"}, {"body": "c"}]',
            [],
            r"x.json: record 3 of the top-level list: no 'text' field",
        ),
        ("x.json", '{"text": "a"}\n{"text": 5}\n', [], r"x.json:2: 'text' is a number \(5\); expected a string"),
    ],
)
def test_malformed_json_names_file_and_line(tmp_path, name, text, extra, match):
    """One clear error naming the file, the line (or record) and what is wrong, and nothing left in the cache."""
    (tmp_path / name).write_text(text)
    cfg = load_config(None, [f"data.path={tmp_path / name}", f"data.cache_dir={tmp_path / 'c'}", *extra])
    with pytest.raises(DataError, match=match) as info:
        prepare_data(cfg.data, progress=False)
    assert "\n" not in str(info.value)
    assert not [p for p in (tmp_path / "c" / "data").iterdir() if not p.name.endswith(".lock")]


def test_bad_utf8_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "a b"}\n{"text": "caf\xe9"}\n')
    cfg = load_config(None, [f"data.path={path}", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid UTF-8 \(byte 14 of the line\)"):
        prepare_data(cfg.data, progress=False)


def test_good_records_pass_the_scan(tmp_path):
    """The scanner accepts what datasets accepts: blank lines, extra fields, nulls in other fields."""
    from megamoe.data.diagnose import first_bad_json, first_bad_line

    rows = [{"text": f"doc {i}", "n": i, "meta": None if i % 2 else {"k": i}} for i in range(5)]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert first_bad_line(good, "text") is None
    listed = tmp_path / "good.json"
    listed.write_text(json.dumps(rows, indent=1))
    assert first_bad_json(listed, "text") is None


def test_dead_temps_are_removed_and_live_ones_kept(tmp_path):
    """remove_dead_temps takes a temp dir whose writer is gone, never a live writer's or another result's."""
    from megamoe.utils.fs import atomic_dir, remove_dead_temps

    final = tmp_path / "result"
    dead = tmp_path / ".result.tmp-999999-deadbeef"
    dead.mkdir()
    (dead / "half").write_text("half-written by a killed writer")
    other = tmp_path / ".other.tmp-1-abc"
    other.mkdir()
    with atomic_dir(final) as live:
        assert remove_dead_temps(final) == [dead]
        assert live.is_dir() and other.is_dir()
        (live / "f").write_text("done")
    assert (final / "f").read_text() == "done" and not live.exists()


def _chained() -> Exception:
    try:
        raise OSError(errno.EFBIG, "File too large")
    except OSError as err:
        try:
            raise ValueError("wrapped") from err
        except ValueError as outer:
            return outer


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
        (Exception("No space left on device (os error 28)"), "no space left on device"),  # tokenizers
        (_chained(), "file too large"),
        (OSError(errno.ENOENT, "No such file or directory"), None),
    ],
)
def test_disk_full_reason(err, reason):
    from megamoe.utils.fs import disk_full_reason

    found = disk_full_reason(err)
    assert found is None if reason is None else reason in found
