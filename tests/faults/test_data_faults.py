"""`megamoe data prepare` under real faults: kill -9 at seeded moments, a full disk, a hung lock holder.

Every fault hits a real `megamoe data prepare` process group (tests/faults/procs.py); the rerun is
the same command line, with no cleanup in between. Caches are compared file by file (sha256) with
an uninterrupted prepare's.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.faults.procs import (
    file_limit,
    fill,
    finish,
    kill_when,
    launch,
    megamoe,
    poll_until,
    run,
    settled,
    signal_group,
    tail,
)

DATA = ["data.max_documents=60", "data.vocab_size=512", "data.val_fraction=0.1", "logging.progress=false"]
"""The tiny data settings of tests/util.py TINY, plus no progress bars."""
SIMILAR = ["data.order=similarity", "data.similarity.hash_features=4096"]
"""Similarity order, with a hashed vocabulary small enough for the SVD to take milliseconds."""
WORDS = [
    "alpha", "beta", "gamma", "delta", "kernel", "tensor", "expert",
    "router", "token", "merge", "shard", "cache", "batch", "layer",
]  # fmt: skip


def write_corpus(path: Path, docs: int = 80) -> Path:
    """A JSON-lines corpus of seeded pseudo-text in three domains (fields body, src)."""
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(docs):
            words = rng.choices(WORDS[i % 3 * 4 :] + WORDS, k=rng.randint(40, 400))
            fh.write(json.dumps({"body": " ".join(words), "src": ["code", "prose", "math"][i % 3]}) + "\n")
    return path


def prepare(cache: Path, *extra: str) -> list[str]:
    """The `megamoe data prepare` command line for the tiny data in cache."""
    return megamoe("data", "prepare", *DATA, f"data.cache_dir={cache}", *extra)


def finished(cache: Path) -> dict[str, Path]:
    """key → folder of every finished cache (non-hidden folders) under cache/data."""
    data = cache / "data"
    return {p.name: p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")} if data.is_dir() else {}


def temps(cache: Path) -> list[str]:
    """Hidden temp entries under cache/data (what a killed writer may leave)."""
    data = cache / "data"
    return sorted(p.name for p in data.glob(".*")) if data.is_dir() else []


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a finished cache; the manifest without its wall-clock timings."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            if manifest.get("similarity"):
                manifest["similarity"].pop("seconds")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def phase(cache: Path, key: str) -> str:
    """Which stage a prepare of `key` had reached, read from what it had written (after a kill)."""
    if (cache / "data" / key).is_dir():
        return "renamed"
    mine = sorted((cache / "data").glob(f".{key}.tmp-*"), key=lambda p: p.stat().st_mtime)
    if not mine:
        return "starting"
    tmp = mine[-1]
    for name, stage in (
        ("manifest.json", "manifest"),
        ("val", "packing val"),
        ("train", "tokenizing+packing train"),
        ("tokenizer.json", "tokenizer trained"),
        ("similarity/order.npy", "ordered"),
        ("similarity", "ordering"),
    ):
        if (tmp / name).exists():
            return stage
    return "loading"


class Build:
    """Watches cache/data for a prepare's temp dir; now() is the time since it appeared (None before)."""

    def __init__(self, cache: Path, key: str):
        self.cache, self.key = cache, key
        self.before = set(temps(cache))
        self.seen_at: float | None = None

    def now(self) -> float | None:
        if self.seen_at is None and any(
            n.startswith(f".{self.key}.tmp-") and n not in self.before for n in temps(self.cache)
        ):
            self.seen_at = time.monotonic()
        return None if self.seen_at is None else time.monotonic() - self.seen_at


def build_window(cmd: list[str], cache: Path, key: str, log: Path) -> float:
    """Run cmd uninterrupted; seconds from its temp dir's appearance to its rename to the final name."""
    proc, build = launch(cmd, log), Build(cache, key)
    renamed = None
    while proc.poll() is None:
        build.now()
        if renamed is None and (cache / "data" / key).is_dir():
            renamed = time.monotonic()
        time.sleep(0.005)
    settled(proc)
    assert proc.returncode == 0, tail(log)
    assert build.seen_at is not None and renamed is not None, "the prepare's temp dir or rename went unseen"
    return renamed - build.seen_at


def cache_key_of(cache: Path, *extra: str) -> str:
    """The cache key the command line `prepare(cache, *extra)` uses."""
    from megamoe.config import load_config
    from megamoe.data.prepare import cache_key

    return cache_key(load_config(None, [*DATA, f"data.cache_dir={cache}", *extra]).data)


def kill_and_rerun(cmd, cache, key, ref, good, ready, log) -> str:
    """SIGKILL the prepare's group when ready(build) holds, check, rerun the same command; returns the phase hit."""
    build = Build(cache, key)
    proc = launch(cmd, log)
    killed = kill_when(proc, lambda: ready(build), timeout=120)
    proc.wait()
    assert settled(proc), "a process of the killed prepare survived"
    hit = phase(cache, key) if killed else "finished first"
    caches = finished(cache)
    if key in caches:  # killed after the rename: complete, never half-written
        assert digest(caches[key]) == ref, f"{key} exists after a kill at '{hit}' but differs from the reference"
    for other, files in good.items():
        assert digest(caches[other]) == files, f"the good cache {other} changed (kill at '{hit}')"
    assert run(cmd, log) == 0, f"rerun after a kill at '{hit}' failed:\n{tail(log)}"
    assert digest(finished(cache)[key]) == ref, f"the rerun after a kill at '{hit}' built a different cache"
    assert temps(cache) == [], f"the rerun left temp entries: {temps(cache)}"
    for other, files in good.items():
        assert digest(finished(cache)[other]) == files
    return hit


def moments(seed: int, count: int, window: float) -> list[float]:
    """count seeded random offsets spread over [0, window): one uniform draw in each of count equal strata."""
    rng = random.Random(seed)
    return [(i + rng.random()) * window / count for i in range(count)]


def kill_series(cmd, cache, key, good, offsets, events, log) -> list[str]:
    """Kill at each offset after the temp dir appears and at each event (a file appearing in it); rerun each time."""
    ref = digest(finished(cache)[key])
    hits = []
    readies = [lambda b, t=t: (b.now() or -1.0) >= t for t in offsets]
    readies += [
        lambda b, e=e: b.now() is not None and any(Path(t, e).exists() for t in _tmps(cache, key)) for e in events
    ]
    for ready in readies:
        shutil.rmtree(cache / "data" / key)
        shutil.rmtree(cache / "hf", ignore_errors=True)  # the datasets cache of a jsonl source is rebuilt too
        hits.append(kill_and_rerun(cmd, cache, key, ref, good, ready, log))
    return hits


def _tmps(cache: Path, key: str) -> list[Path]:
    return list((cache / "data").glob(f".{key}.tmp-*"))


@pytest.mark.slow
def test_kill9_during_prepare_then_rerun_gives_the_same_cache(tmp_path):
    """SIGKILL at 8 seeded moments (4 per source/order) and at 2 chosen stages; each rerun finishes, byte-identical.

    Embedded corpus in random order, and a jsonl corpus in similarity order, share one cache dir:
    each is the 'previous good cache' the other's kills must not touch.
    """
    cache, log = tmp_path / "cache", tmp_path / "prepare.log"
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    jsonl = [f"data.path={corpus}", "data.text_field=body", "data.domain_field=src", *SIMILAR]
    configs = {"embedded/random": [], "jsonl/similarity": jsonl}
    keys = {name: cache_key_of(cache, *extra) for name, extra in configs.items()}
    windows = {name: build_window(prepare(cache, *extra), cache, keys[name], log) for name, extra in configs.items()}
    report = {}
    for seed, (name, extra) in enumerate(configs.items()):
        other = next(n for n in configs if n != name)
        good = {keys[other]: digest(finished(cache)[keys[other]])}
        events = ["similarity/embeddings.npy"] if extra else ["train/tokens.bin"]
        offsets = moments(seed, 4, windows[name])
        report[name] = kill_series(prepare(cache, *extra), cache, keys[name], good, offsets, events, log)
    print("build windows (s):", {n: round(w, 2) for n, w in windows.items()}, "\nstages hit:", report)
    stages = {s for hits in report.values() for s in hits}
    for wanted in ({"loading"}, {"ordering", "ordered"}, {"tokenizing+packing train", "packing val"}):
        assert stages & wanted, f"no kill hit {wanted}: {report}"


@pytest.mark.slow
def test_a_waiting_prepare_names_the_lock_and_its_holder_and_outlives_it(tmp_path):
    """A hung holder (SIGSTOPped mid-build): the second prepare says what it waits for, and builds once it is killed."""
    cache, log_a, log_b = tmp_path / "cache", tmp_path / "a.log", tmp_path / "b.log"
    key = cache_key_of(cache)
    holder = launch(prepare(cache), log_a)
    build = Build(cache, key)
    assert kill_when(holder, lambda: build.now() is not None, 60, signal.SIGSTOP), tail(log_a)
    waiter = launch(prepare(cache), log_b)
    assert poll_until(lambda: "waiting" in tail(log_b), 60), f"the waiting prepare said nothing:\n{tail(log_b)}"
    said = tail(log_b)
    assert str(cache / "data" / f"{key}.lock") in said and f"(pid {holder.pid} on " in said, said
    signal_group(holder, signal.SIGKILL)
    holder.wait()
    assert settled(holder)
    assert finish(waiter, 120, log_b) == 0, tail(log_b)
    assert "left by a prepare that was killed" in tail(log_b)
    assert list(finished(cache)) == [key] and temps(cache) == []


@pytest.mark.slow
def test_a_prepare_of_other_data_leaves_a_live_build_alone(tmp_path):
    """Two prepares of different data in one cache dir: the second must not delete the first's temp dir.

    Before the fix, every prepare removed every hidden temp of the cache dir, so the first one
    (paused here mid-build, as a slow build would be) lost its half-written cache and crashed.
    """
    cache, log_a, log_b = tmp_path / "cache", tmp_path / "a.log", tmp_path / "b.log"
    key = cache_key_of(cache)
    first = launch(prepare(cache), log_a)
    build = Build(cache, key)
    assert kill_when(first, lambda: build.now() is not None, 60, signal.SIGSTOP), tail(log_a)
    assert run(prepare(cache, "data.seed=7"), log_b) == 0, tail(log_b)
    signal_group(first, signal.SIGCONT)
    assert finish(first, 120, log_a) == 0, tail(log_a)
    assert len(finished(cache)) == 2 and temps(cache) == []


def assert_full_disk_error(log: Path, where: Path, reason: str) -> None:
    """One error line naming the folder written, the reason and what to do; no traceback."""
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("megamoe: error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert str(where) in errors[0] and reason in errors[0] and "free space" in errors[0], errors[0]


@pytest.mark.slow
def test_full_disk_during_prepare(tmp_path, small_disk):
    """Writes fail at several points of a prepare (a full tmpfs, else a file-size limit): exit 2 with one clear
    line, nothing under a final name, no temp left, the good cache beside it intact; with room again, it builds."""
    disk = small_disk or tmp_path / "disk"
    cache, log = disk / "cache", tmp_path / "prepare.log"
    corpus = write_corpus(tmp_path / "small.jsonl", docs=30)
    assert run(prepare(cache, f"data.path={corpus}", "data.text_field=body", "data.vocab_size=300"), log) == 0
    good = {k: digest(p) for k, p in finished(cache).items()}
    key, reason = cache_key_of(cache), "no space left on device" if small_disk else "file too large"
    # free bytes (or the file-size limit): none; less than tokenizer.json; inside the token files
    for room in (0, 16 << 10, 600 << 10):
        if small_disk:
            fill(disk, room)
            rc = run(prepare(cache), log)
        else:
            rc = run(prepare(cache), log, preexec_fn=file_limit(room))
        assert rc == 2, f"{room} bytes free: exit {rc}\n{tail(log)}"
        assert_full_disk_error(log, cache / "data" / key, reason)
        assert key not in finished(cache) and temps(cache) == [], f"{room} bytes free: left {temps(cache)}"
        assert {k: digest(p) for k, p in finished(cache).items()} == good
        log.unlink()
    (disk / "filler").unlink(missing_ok=True)
    assert run(prepare(cache), log) == 0, tail(log)
    assert {k: digest(p) for k, p in finished(cache).items() if k in good} == good


@pytest.mark.slow
def test_file_size_limit_while_datasets_caches_a_jsonl(tmp_path):
    """RLIMIT_FSIZE hits HF datasets' own Arrow cache of a jsonl source: still one clear line, exit 2."""
    cache, log = tmp_path / "cache", tmp_path / "prepare.log"
    corpus = write_corpus(tmp_path / "c.jsonl")
    cmd = prepare(cache, f"data.path={corpus}", "data.text_field=body")
    assert run(cmd, log, preexec_fn=file_limit(4096)) == 2, tail(log)
    assert_full_disk_error(log, cache / "hf", "file too large")
    assert finished(cache) == {} and temps(cache) == []
    assert run(cmd, log) == 0, tail(log)
