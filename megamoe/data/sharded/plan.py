"""The plan stage: which documents are used, how they split, their domains, the tokenizer and the embedder.

One task. Everything later stages need to know about the corpus is decided here, from the same
functions the one-process preparation uses (so a sharded cache holds the same documents, split,
order and tokenizer as `data.shard_documents: 0` would).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from megamoe.config import DataConfig
from megamoe.data.corpus import load_documents
from megamoe.data.prepare import SELECT_BATCH, select_documents, split_documents, tokenizer_for
from megamoe.data.sharded.layout import Layout, stage_output


def hf_cache(cfg: DataConfig) -> Path:
    """Where datasets caches converted source files."""
    return Path(cfg.cache_dir).expanduser() / "hf"


def domain_codes(docs) -> tuple[np.ndarray, list[str]]:
    """Every document's domain as an index into the domain names seen (read in batches)."""
    names: dict[str, int] = {}
    codes = []
    for batch in docs.select_columns(["domain"]).iter(batch_size=SELECT_BATCH):
        codes += [names.setdefault(d, len(names)) for d in batch["domain"]]
    return np.asarray(codes, np.int64), list(names)


def domain_ids(docs, used: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(domain id of every document, sorted domain names of the used documents)."""
    code_D, names = domain_codes(docs)
    present = sorted({names[c] for c in np.unique(code_D[used])})
    rank = {name: i for i, name in enumerate(present)}
    remap = np.asarray([rank.get(name, 0) for name in names], np.uint16)
    return remap[code_D], present


def fit_embedder(cfg: DataConfig, docs, train_sorted: np.ndarray, seed: int):
    """The similarity embedder fitted on a sample of the training documents (as the one-process path fits it)."""
    from megamoe.data.similarity.embed import make_embedder

    batch = cfg.similarity.batch_size

    def texts(rows: np.ndarray | None):
        chosen = docs.select(train_sorted if rows is None else train_sorted[rows])
        for part in chosen.iter(batch_size=batch):
            yield part["text"]

    embedder = make_embedder(cfg.similarity, seed)
    embedder.fit(texts, len(train_sorted))
    return embedder


def run_plan(cfg: DataConfig, layout: Layout) -> None:
    """Write plan/ (nothing to do when it is there)."""
    with stage_output(layout.plan) as out:
        if out is None:
            return
        docs = load_documents(cfg, hf_cache(cfg))
        doc_idx, empty = select_documents(cfg, docs)
        splits = split_documents(doc_idx, cfg)
        domain_D, domains = domain_ids(docs, doc_idx)
        np.save(out / "domain.npy", domain_D)
        for name, order in splits.items():
            np.save(out / f"{name}_order.npy", order)
            np.save(out / f"{name}_sorted.npy", np.sort(order))
        tok, trained = tokenizer_for(cfg, docs, splits["train"])
        tok.save(str(out / "tokenizer.json"))
        if cfg.order == "similarity" and cfg.similarity.embedder == "tfidf":
            embedder = fit_embedder(cfg, docs, np.sort(splits["train"]), cfg.seed)
            (out / "embedder.pkl").write_bytes(pickle.dumps(embedder))
        summary = {
            "documents": {"total": len(docs), "empty_skipped": empty, "used": len(doc_idx)},
            "domains": domains,
            "splits": {name: len(order) for name, order in splits.items()},
            "tokenizer_trained": trained,
        }
        (out / "plan.json").write_text(json.dumps(summary, indent=1, sort_keys=True))


def load_embedder(cfg: DataConfig, layout: Layout):
    """The plan's fitted embedder (a sentence-transformers model needs no fitting: loaded afresh)."""
    path = layout.plan / "embedder.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    from megamoe.data.similarity.embed import make_embedder

    return make_embedder(cfg.similarity, cfg.seed)
