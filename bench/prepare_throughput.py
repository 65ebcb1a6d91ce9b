"""Tokenization throughput of `megamoe data prepare`: one process vs sharded on 1..W local workers (and SLURM).

Usage: python -m bench.prepare_throughput [--docs 200000] [--words 150] [--shard 10000] [--workers 1 2] [--slurm]
A seeded JSON-lines corpus (words from a 30,000-word vocabulary) and a 8,192-token BPE trained on a
sample are written first (not timed); every variant then prepares the corpus, random order, into a
fresh cache with that tokenizer (data.tokenizer, so no variant trains one), as a child process
`megamoe data prepare`: wall seconds, tokens/s and the peak RSS of its largest process (wait4).
Shard overhead = sharded on 1 worker ÷ one process. The SLURM variant polls for the manifest, so
its time includes the scheduler's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 30_000


def write_corpus(path: Path, docs: int, words: int, seed: int = 0) -> None:
    """docs lines of {"text": ...}, each words ± 50% words long."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(VOCAB)])
    with open(path, "w") as fh:
        for start in range(0, docs, 10_000):
            n = min(10_000, docs - start)
            lengths = rng.integers(words // 2, words * 3 // 2 + 1, n)
            ids = rng.zipf(1.2, size=(n, lengths.max())) % VOCAB
            fh.writelines(json.dumps({"text": " ".join(vocab[ids[i, : lengths[i]]])}) + "\n" for i in range(n))


def write_tokenizer(corpus: Path, out: Path) -> None:
    """A byte-level BPE trained on the corpus's first 20,000 lines."""
    from megamoe.data.tokenizer import train_bpe

    with open(corpus) as fh:
        texts = [json.loads(line)["text"] for line, _ in zip(fh, range(20_000))]
    train_bpe(texts, 8192).save(str(out))


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the largest process) of a child command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def wait_for(path: Path, timeout: float = 3600) -> None:
    """Poll until path exists."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.5)


def main() -> None:
    """Run every variant and print one JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--words", type=int, default=150)
    parser.add_argument("--shard", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slurm", action="store_true", help="also submit it to the local SLURM (sbatch)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prep_bench_"))
    corpus, tokenizer = tmp / "corpus.jsonl", tmp / "tokenizer.json"
    write_corpus(corpus, args.docs, args.words)
    write_tokenizer(corpus, tokenizer)
    base = [sys.executable, "-m", "megamoe", "data", "prepare", f"data.path={corpus}", f"data.tokenizer={tokenizer}",
            "logging.progress=false"]  # fmt: skip
    record: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "documents": args.docs}
    variants = {"one_process": [*base, f"data.cache_dir={tmp}/one"]}
    shard = [f"data.shard_documents={args.shard}"]
    for w in args.workers:
        variants[f"sharded_w{w}"] = [*base, *shard, f"data.cache_dir={tmp}/w{w}", f"--workers={w}"]
    for name, cmd in variants.items():
        seconds, rss = run(cmd)
        record[name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(rss)}
    manifest = json.loads(next((tmp / "one" / "data").glob("*/manifest.json")).read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    record["tokens"] = tokens
    if args.slurm:
        start = time.perf_counter()
        out = subprocess.run([*base, *shard, f"data.cache_dir={tmp}/slurm", "--slurm"], capture_output=True, text=True)
        root = out.stdout.strip().splitlines()[-1].split(": ", 1)[1].split(" (")[0]
        wait_for(Path(root) / "manifest.json")
        record["slurm"] = {"seconds": round(time.perf_counter() - start, 1)}
    for name in [n for n in record if isinstance(record[n], dict) and "seconds" in record[n]]:
        record[name]["tokens_per_s"] = round(tokens / record[name]["seconds"])
    record["shard_overhead"] = round(record["sharded_w1"]["seconds"] / record["one_process"]["seconds"], 3)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
