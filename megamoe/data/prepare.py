"""`megamoe data prepare`: documents → tokenizer → packed, memory-mapped train/val token streams.

The result lives in <data.cache_dir>/data/<key>, where key hashes the source files (paths, sizes,
modification times) and every setting that changes the output. It is written to a temp dir
(.<key>.tmp-*), synced and renamed, under the file lock <key>.lock, so concurrent runs (or ranks)
prepare it once and a crash, kill -9 or full disk leaves nothing half-written under <key>; a later
run with the same key reuses it. A rerun removes what a killed prepare of the same key left (only
temps whose writer is gone: prepares of other data in the same cache dir are never touched). A
prepare that waits for the lock says for whom, at once and every minute. A full disk is one
error line (exit 2) naming the cache and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from megamoe.config import DataConfig
from megamoe.data.corpus import load_documents, source_fingerprint
from megamoe.data.doc_stats import document_stats
from megamoe.data.packed import PackedSplit, SplitWriter, token_dtype
from megamoe.data.tokenizer import eod_id, load_tokenizer, train_bpe
from megamoe.errors import DataError, MegamoeError
from megamoe.utils.fs import atomic_dir, atomic_write_json, disk_full_reason, remove_dead_temps
from megamoe.utils.locks import open_locked

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_FIELDS = (
    "path", "format", "text_field", "domain_field", "tokenizer", "vocab_size",
    "val_fraction", "order", "seed", "max_documents", "exclude_domains",
)  # fmt: skip
"""DataConfig fields that change the prepared output (cache_dir does not)."""
ENCODE_BATCH = 256
SELECT_BATCH = 8192
"""Documents read per batch while selecting the usable ones."""
STREAM_CHUNK = 1 << 24
"""Tokens read per chunk by the streamed statistics."""
"""Documents read per batch while selecting the usable ones."""


@dataclass
class PreparedData:
    """A finished data cache: manifest, tokenizer file and the two splits."""

    root: Path
    manifest: dict

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer.json used to pack the tokens."""
        return self.root / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        """Token ids are < vocab_size."""
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def domains(self) -> list[str]:
        """Domain names; a token's domain id indexes this list."""
        return list(self.manifest["domains"])

    def split(self, name: str) -> PackedSplit:
        """The 'train' or 'val' split."""
        return PackedSplit(self.root / name, np.dtype(self.manifest["dtype"]))


def key_settings(cfg: DataConfig) -> dict:
    """The settings that change the output (the similarity section only when it is used)."""
    settings = {f: getattr(cfg, f) for f in KEY_FIELDS}
    settings["similarity"] = dataclasses.asdict(cfg.similarity) if cfg.order == "similarity" else None
    if not cfg.path and cfg.embedded_unit != "module":  # absent by default: earlier caches keep their keys
        settings["embedded_unit"] = cfg.embedded_unit
    if cfg.shard_documents:  # a sharded cache (data.shard_documents) has another layout
        settings["shard_documents"] = cfg.shard_documents
    return settings


def cache_key(cfg: DataConfig) -> str:
    """Hash of the source and every output-changing setting."""
    settings = key_settings(cfg)
    ident = {"version": FORMAT_VERSION, "source": source_fingerprint(cfg), "settings": settings}
    if cfg.tokenizer:
        ident["tokenizer"] = hashlib.sha256(Path(cfg.tokenizer).expanduser().read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def prepare_packed(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """One source prepared in this process: reused from the cache, or built once and cached."""
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # fail early, before hashing, on a missing/bad file
    key = cache_key(cfg)
    root = Path(cfg.cache_dir).expanduser() / "data" / key
    try:
        with cache_lock(root.with_suffix(".lock")):
            if (root / "manifest.json").is_file():
                log.info("data: reusing %s", root)
            else:
                _build_atomically(cfg, key, root, progress)
    except MegamoeError:
        raise
    except Exception as err:  # tokenizers reports a full disk as a bare Exception, numpy as an OSError
        reason = disk_full_reason(err)
        if reason is None:
            raise
        raise DataError(
            f"data.cache_dir: {reason} while writing the data cache {root} (nothing was kept); "
            "free space there or set data.cache_dir to a larger disk"
        ) from None
    return PreparedData(root, json.loads((root / "manifest.json").read_text()))


def _build_atomically(cfg: DataConfig, key: str, root: Path, progress: bool) -> None:
    """Build into a temp dir renamed to root; what killed builders of this key left is removed first."""
    if root.exists():  # atomic_dir never leaves this: someone removed files from a finished cache
        raise DataError(f"data.cache_dir: {root} is incomplete (no manifest.json); delete that folder and rerun")
    for stale in remove_dead_temps(root):
        log.info("data: removed %s, left by a prepare that was killed", stale.name)
    with atomic_dir(root) as tmp:
        _build(cfg, key, tmp, progress)


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive file lock: one process prepares, the others wait (saying for whom) and then reuse."""

    def waiting(seconds: float, holder: str) -> None:
        log.warning(
            "data: waiting (%.0f s so far) for %s, held by another prepare of the same data (%s); "
            "its result is reused when it finishes",
            seconds, path, holder,
        )  # fmt: skip

    with open_locked(path, waiting):
        yield


def select_documents(cfg: DataConfig, docs: datasets.Dataset) -> tuple[np.ndarray, int]:
    """Indices of usable documents (non-empty, not excluded, subsampled) and the empty count."""
    excluded = set(cfg.exclude_domains)
    keep, empty, start = [], 0, 0
    for batch in docs.select_columns(["text", "domain"]).iter(batch_size=SELECT_BATCH):  # never all texts at once
        for i, (text, domain) in enumerate(zip(batch["text"], batch["domain"]), start):
            if not text or not text.strip():
                empty += 1
            elif domain not in excluded:
                keep.append(i)
        start += len(batch["text"])
    keep_idx = np.asarray(keep, dtype=np.int64)
    if cfg.max_documents and len(keep_idx) > cfg.max_documents:
        rng = np.random.default_rng([cfg.seed, 1])
        keep_idx = np.sort(rng.choice(keep_idx, cfg.max_documents, replace=False))
    if len(keep_idx) < 2:
        where = cfg.path or "the embedded corpus"
        raise DataError(f"data.path: {where} has {len(keep_idx)} usable non-empty documents; need at least 2")
    return keep_idx, empty


def split_documents(doc_idx: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Seeded split by document; each split's order is random (the val split's whatever data.order says)."""
    perm = np.random.default_rng([cfg.seed, 2]).permutation(doc_idx)
    num_val = min(max(1, round(cfg.val_fraction * len(perm))), len(perm) - 1)
    return {"train": perm[num_val:], "val": perm[:num_val]}


def tokenizer_for(cfg: DataConfig, docs: datasets.Dataset, train_idx: np.ndarray):
    """The configured tokenizer, or a BPE trained on the training documents."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), False
    log.info("data: training a %d-token byte-level BPE on %d documents", cfg.vocab_size, len(train_idx))
    train_docs = docs.select(np.sort(train_idx))
    texts = (batch["text"] for batch in train_docs.iter(batch_size=ENCODE_BATCH))
    return train_bpe(texts, cfg.vocab_size), True


def _write_split(writer: SplitWriter, docs, order, tok, eod, domain_ids, progress, name) -> dict:
    """Tokenize the documents of one split in order (batched, parallel) and pack them."""
    bar = tqdm(total=len(order), desc=f"tokenize {name}", disable=not progress, unit="doc")
    for start in range(0, len(order), ENCODE_BATCH):
        chunk = order[start : start + ENCODE_BATCH]
        rows = docs.select(chunk)
        for doc_id, enc, domain in zip(chunk, tok.encode_batch(rows["text"]), rows["domain"]):
            writer.add(enc.ids, eod, domain_ids[domain], int(doc_id))
        bar.update(len(chunk))
    bar.close()
    return writer.close()


def unigram_perplexity(train: PackedSplit, val: PackedSplit, vocab_size: int) -> float:
    """Perplexity of val under add-one-smoothed unigram frequencies of train (the floor to beat), streamed."""
    counts = np.ones(vocab_size, np.float64)
    for start in range(0, len(train.tokens), STREAM_CHUNK):
        counts += np.bincount(np.asarray(train.tokens[start : start + STREAM_CHUNK]), minlength=vocab_size)
    logp = np.log(counts / counts.sum())
    total, count = 0.0, 0
    for start in range(1, len(val.tokens), STREAM_CHUNK):
        ids = np.asarray(val.tokens[start : start + STREAM_CHUNK])
        total, count = total + float(logp[ids].sum()), count + len(ids)
    return float(math.exp(-total / max(count, 1)))


def _similarity_order(cfg: DataConfig, docs, train_idx, domain_ids, out: Path, progress: bool):
    """The training documents in similarity order (near-duplicates left out) and the ordering report."""
    from megamoe.data.similarity import order_documents

    train_idx = np.sort(train_idx)
    batch = cfg.similarity.batch_size

    def texts(rows: np.ndarray | None):
        chosen = docs.select(train_idx if rows is None else train_idx[rows])
        for part in chosen.iter(batch_size=batch):
            yield part["text"]

    domain_col = docs.select(train_idx)["domain"]
    domain_N = np.asarray([domain_ids[d] for d in domain_col], dtype=np.int64)
    (out / "similarity").mkdir()
    path, report = order_documents(cfg.similarity, texts, domain_N, out / "similarity", cfg.seed, progress)
    return train_idx[path], report


def _build(cfg: DataConfig, key: str, out: Path, progress: bool) -> None:
    """Prepare everything into out (a temp dir renamed by the caller)."""
    docs = load_documents(cfg, Path(cfg.cache_dir).expanduser() / "hf")
    doc_idx, empty = select_documents(cfg, docs)
    splits = split_documents(doc_idx, cfg)
    domain_col = docs["domain"]
    domains = sorted({domain_col[int(i)] for i in doc_idx})
    domain_ids = {d: i for i, d in enumerate(domains)}
    similarity = None
    if cfg.order == "similarity":
        splits["train"], similarity = _similarity_order(cfg, docs, splits["train"], domain_ids, out, progress)
    tok, trained = tokenizer_for(cfg, docs, splits["train"])
    tok.save(str(out / "tokenizer.json"))
    eod = eod_id(tok, "data.tokenizer")
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    counts = {
        name: _write_split(SplitWriter(out / name, dtype), docs, idx, tok, eod, domain_ids, progress, name)
        for name, idx in splits.items()
    }
    ppl = unigram_perplexity(PackedSplit(out / "train", dtype), PackedSplit(out / "val", dtype), vocab)
    train = PackedSplit(out / "train", dtype)
    manifest = {
        "key": key,
        "format_version": FORMAT_VERSION,
        "settings": key_settings(cfg),
        "source": cfg.path or "embedded: Python standard-library sources",
        "tokenizer": {"vocab_size": vocab, "eod_id": eod, "eod": tok.id_to_token(eod), "trained": trained},
        "dtype": dtype.name,
        "domains": domains,
        "documents": {"total": len(docs), "empty_skipped": empty, "used": sum(map(len, splits.values()))},
        "train_documents": document_stats(train.doc_offsets, len(train.tokens)),
        "similarity": similarity,
        "splits": counts,
        "unigram_val_ppl": ppl,
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(out / "manifest.json", manifest)
