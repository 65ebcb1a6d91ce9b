"""Similarity ordering of N generated short documents end to end: time per stage and peak memory.

Usage: python -m bench.similarity_order [--docs 1000000] [--k 10] [--topics 2000] [--index auto] [--progress]
Documents are drawn from a topic model (each document: 24–40 words, 70% from its topic's 40-word
vocabulary, 30% from a 30,000-word background); their word ids are generated into a memmap first
(generate_s, not part of total_s) and joined into text batch by batch like a dataset read. The
topic id is the "domain" of the quality report. Stages:
embed (hashing TF-IDF + SVD fit on a sample, then every document), kNN (faiss index build +
search + exact re-rank), traverse (graph + greedy path). Peak RSS is the process's maximum resident
set (ru_maxrss), which includes the Python interpreter, torch-free imports and faiss; peak_rss_mib_by_stage
splits it by stage from /proc/self/statm sampled every 0.1 s (Linux; "report" is what follows traverse).
Memory at 10M documents: the word ids are a 0.8 GB memmap (mapped only while texts are read), the
float16 embeddings a 1.3 GB one; mapped pages that were touched count in the resident set. INFO logs
(stderr) time the kNN index build and search separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import tempfile
import threading
import time
from operator import itemgetter
from pathlib import Path

import numpy as np

from megamoe.config import SimilarityConfig
from megamoe.data.similarity import order_documents

BACKGROUND_WORDS = 30_000
TOPIC_WORDS = 40
MIN_WORDS, MAX_WORDS = 24, 40


def make_corpus(num_docs: int, topics: int, folder: Path, seed: int = 0):
    """(texts(rows) batch reader, topic id of each document); the word ids live in a memmap in folder."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(BACKGROUND_WORDS)]
    topic_vocab_TW = rng.integers(BACKGROUND_WORDS, size=(topics, TOPIC_WORDS))
    topic_N = rng.integers(topics, size=num_docs)
    length_N = rng.integers(MIN_WORDS, MAX_WORDS + 1, size=num_docs)
    words_NW = np.lib.format.open_memmap(folder / "words.npy", "w+", np.uint16, (num_docs, MAX_WORDS))
    for start in range(0, num_docs, 65536):
        rows = slice(start, min(start + 65536, num_docs))
        n = rows.stop - rows.start
        pick_NW = rng.integers(TOPIC_WORDS, size=(n, MAX_WORDS))
        topical_NW = np.take_along_axis(topic_vocab_TW[topic_N[rows]], pick_NW, 1)
        background_NW = rng.integers(BACKGROUND_WORDS, size=(n, MAX_WORDS))
        words_NW[rows] = np.where(rng.random((n, MAX_WORDS)) < 0.7, topical_NW, background_NW)
    words_NW.flush()
    del words_NW  # each pass maps the file afresh, so its pages leave the resident set after the pass

    def texts(rows, batch: int = 4096):
        rows = np.arange(num_docs) if rows is None else np.asarray(rows)
        words_NW = np.load(folder / "words.npy", mmap_mode="r")
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            lines = zip(words_NW[chunk].tolist(), length_N[chunk].tolist(), strict=True)
            yield [" ".join(itemgetter(*row[:n])(vocab)) for row, n in lines]

    return texts, topic_N


class RssSampler(threading.Thread):
    """This process's resident set size, sampled every `every` seconds while running (Linux /proc)."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    def run(self) -> None:
        """Sample until done is set."""
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.done.wait(self.every):
            with open("/proc/self/statm") as statm:
                self.samples.append((time.perf_counter(), int(statm.read().split()[1]) * page))

    def peaks_mib(self, start: float, seconds: dict[str, float]) -> dict[str, int | None]:
        """Peak sampled RSS (MiB) of each stage, the stages running back to back from start; the rest is 'report'."""
        bounds, peaks = [start], {}
        for stage in seconds:
            bounds.append(bounds[-1] + seconds[stage])
        for stage, lo, hi in zip([*seconds, "report"], bounds, [*bounds[1:], float("inf")], strict=True):
            inside = [rss for t, rss in self.samples if lo <= t < hi]
            peaks[stage.removesuffix("_s")] = round(max(inside) / 2**20) if inside else None
        return peaks


def main() -> None:
    """Run the benchmark and print one JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--topics", type=int, default=2000)
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "ivfpq", "fastscan"])
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("megamoe").setLevel(logging.INFO)
    cfg = SimilarityConfig(k=args.k, index=args.index)
    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        clock = time.perf_counter()
        texts, topic_N = make_corpus(args.docs, args.topics, Path(tmp))
        generate_s = time.perf_counter() - clock
        start = time.perf_counter()
        path, report = order_documents(cfg, texts, topic_N, Path(tmp), seed=0, progress=args.progress)
        embeddings_mb = (Path(tmp) / "embeddings.npy").stat().st_size / 2**20
    assert np.array_equal(np.sort(path), np.arange(args.docs)), "every document exactly once"
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "documents": args.docs,
        "generate_s": round(generate_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_rss_mib_by_stage": sampler.peaks_mib(start, report["seconds"]),
        "embeddings_mib": round(embeddings_mb),
        **report,
    }
    sampler.done.set()
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
