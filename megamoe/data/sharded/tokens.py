"""The token stage: one shard of a split's documents (in sorted id order) tokenized, and embedded for the kNN.

A shard folder holds tokens.bin (each document's tokens and its EOD), lengths.npy (tokens per
document, EOD included) and, for the training split of a similarity order, embeddings.npy (float16,
one unit row per document).
"""

from __future__ import annotations

import numpy as np

from megamoe.config import DataConfig
from megamoe.data.corpus import load_documents
from megamoe.data.packed import token_dtype
from megamoe.data.prepare import ENCODE_BATCH
from megamoe.data.sharded.layout import Layout, load_rows, shard_rows, stage_output
from megamoe.data.sharded.plan import hf_cache, load_embedder
from megamoe.data.tokenizer import eod_id, load_tokenizer


def token_shards(counts: dict[str, int], size: int) -> list[tuple[str, int]]:
    """(split, shard) of every token-stage task, train first."""
    from megamoe.data.sharded.layout import SPLITS, num_shards

    return [(split, s) for split in SPLITS for s in range(num_shards(counts[split], size))]


def _tokenize(docs, tok, eod: int, dtype: np.dtype, out) -> None:
    """tokens.bin and lengths.npy of the given documents, in order."""
    lengths = []
    with open(out / "tokens.bin", "wb") as fh:
        for batch in docs.iter(batch_size=ENCODE_BATCH):
            encoded = [[*enc.ids, eod] for enc in tok.encode_batch(batch["text"])]
            lengths += map(len, encoded)
            fh.write(np.fromiter((t for ids in encoded for t in ids), dtype=dtype).tobytes())
    np.save(out / "lengths.npy", np.asarray(lengths, np.int64))


def _embed(cfg: DataConfig, layout: Layout, docs, out) -> None:
    """embeddings.npy of the given documents (batches of data.similarity.batch_size)."""
    embedder = load_embedder(cfg, layout)
    emb_NK = np.lib.format.open_memmap(out / "embeddings.npy", "w+", np.float16, (len(docs), embedder.dim))
    start = 0
    for batch in docs.iter(batch_size=cfg.similarity.batch_size):
        emb_NK[start : start + len(batch["text"])] = embedder(batch["text"])
        start += len(batch["text"])
    emb_NK.flush()
    del emb_NK


def run_tokens(cfg: DataConfig, layout: Layout, split: str, shard: int) -> None:
    """Tokenize (and embed) one shard; nothing to do when its folder is there."""
    with stage_output(layout.tokens(split, shard)) as out:
        if out is None:
            return
        ids = load_rows(layout.plan, f"{split}_sorted")
        docs = load_documents(cfg, hf_cache(cfg)).select(ids[shard_rows(len(ids), cfg.shard_documents, shard)])
        docs = docs.select_columns(["text"])
        tok = load_tokenizer(layout.plan / "tokenizer.json", "data.tokenizer")
        _tokenize(docs, tok, eod_id(tok, "data.tokenizer"), token_dtype(tok.get_vocab_size()), out)
        if split == "train" and cfg.order == "similarity":
            _embed(cfg, layout, docs, out)
