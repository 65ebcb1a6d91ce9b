"""The finish stage: list the packed shards, write the manifest, and rename the output to the cache key (one task)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from megamoe.config import DataConfig
from megamoe.data.doc_stats import document_stats
from megamoe.data.packed import SHARDS_FILE, PackedSplit, token_dtype
from megamoe.data.prepare import FORMAT_VERSION, key_settings, unigram_perplexity
from megamoe.data.sharded.layout import SPLITS, Layout, read_json, remove_intermediates
from megamoe.data.tokenizer import eod_id, load_tokenizer
from megamoe.errors import DataError
from megamoe.utils.fs import atomic_write_json, fsync_path, fsync_tree


def _list_shards(layout: Layout, split: str) -> list[str]:
    """The split's packed shard folders, in order, written to its shards.json."""
    folder = layout.out(split)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("shard_"))
    if not names:
        raise DataError(f"data: the sharded preparation in {layout.work} packed no {split} shard")
    (folder / SHARDS_FILE).write_text(json.dumps({"shards": names}, indent=1) + "\n")
    return names


def build_manifest(cfg: DataConfig, layout: Layout, key: str) -> dict:
    """The manifest of the packed output in work/out (the one-process manifest, plus the shard layout)."""
    plan = read_json(layout.plan / "plan.json")
    tok = load_tokenizer(layout.plan / "tokenizer.json")
    eod, vocab = eod_id(tok, "data.tokenizer"), tok.get_vocab_size()
    dtype = token_dtype(vocab)
    shards = {split: len(_list_shards(layout, split)) for split in SPLITS}
    splits = {split: PackedSplit(layout.out(split), dtype) for split in SPLITS}
    similarity = read_json(layout.order / "report.json") if cfg.order == "similarity" else None
    return {
        "key": key,
        "format_version": FORMAT_VERSION,
        "settings": key_settings(cfg),
        "source": cfg.path or "embedded: Python standard-library sources",
        "tokenizer": {
            "vocab_size": vocab,
            "eod_id": eod,
            "eod": tok.id_to_token(eod),
            "trained": plan["tokenizer_trained"],
        },
        "dtype": np.dtype(dtype).name,
        "domains": plan["domains"],
        "documents": {**plan["documents"], "used": sum(len(s.doc_ids) for s in splits.values())},
        "train_documents": document_stats(splits["train"].doc_offsets, len(splits["train"].tokens)),
        "similarity": similarity,
        "splits": {name: {"documents": len(s.doc_ids), "tokens": len(s.tokens)} for name, s in splits.items()},
        "unigram_val_ppl": unigram_perplexity(splits["train"], splits["val"], vocab),
        "shards": {"documents_per_shard": cfg.shard_documents, **shards},
        "config": dataclasses.asdict(cfg),
    }


def run_finish(cfg: DataConfig, layout: Layout, key: str) -> None:
    """Manifest and tokenizer into work/out, synced, renamed to the cache folder; intermediates removed."""
    if not (layout.root / "manifest.json").is_file():
        out = layout.work / "out"
        shutil.copyfile(layout.plan / "tokenizer.json", out / "tokenizer.json")
        atomic_write_json(out / "manifest.json", build_manifest(cfg, layout, key))
        fsync_tree(out)
        os.rename(out, layout.root)
        fsync_path(layout.root.parent)
    remove_intermediates(layout)
