"""The order stage: the merged neighbor lists → near-duplicates dropped → the greedy path (one task).

Memory: the neighbor lists (N·k ids and similarities) and the graph built from them, O(N·k); the
embeddings stay a memmap (the quality report streams them).
"""

from __future__ import annotations

import json

import numpy as np

from megamoe.config import DataConfig
from megamoe.data.sharded.layout import Layout, load_rows, num_shards, read_json, shard_rows, stage_output
from megamoe.data.similarity import order_from_neighbors
from megamoe.data.similarity.knn import Neighbors


def merged_neighbors(layout: Layout, documents: int, size: int) -> Neighbors:
    """Every query shard's neighbor lists, in row order."""
    parts = [layout.neighbors(s) for s in range(num_shards(documents, size))]
    k = np.load(parts[0] / "ids.npy", mmap_mode="r").shape[1]
    ids_Nk = np.empty((documents, k), np.int32 if documents < 2**31 else np.int64)  # the graph takes either
    sims_Nk = np.empty((documents, k), np.float32)
    for s, part in enumerate(parts):  # into place: never the shards and a concatenated copy at once
        rows = shard_rows(documents, size, s)
        ids_Nk[rows], sims_Nk[rows] = np.load(part / "ids.npy"), np.load(part / "sims.npy")
    return Neighbors(ids_Nk, sims_Nk, read_json(layout.index / "index.json")["index"])


def run_order(cfg: DataConfig, layout: Layout) -> None:
    """order/train_order.npy (document ids in path order) and order/report.json."""
    with stage_output(layout.order) as out:
        if out is None:
            return
        train_sorted = load_rows(layout.plan, "train_sorted")
        nbrs = merged_neighbors(layout, len(train_sorted), cfg.shard_documents)
        emb_NK = np.load(layout.index / "embeddings.npy", mmap_mode="r")
        domain_N = load_rows(layout.plan, "domain")[train_sorted].astype(np.int64)
        path, report = order_from_neighbors(cfg.similarity, nbrs, emb_NK, domain_N, cfg.seed)
        np.save(out / "train_order.npy", train_sorted[path])
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))


def split_order(cfg: DataConfig, layout: Layout, split: str) -> np.ndarray:
    """A split's document ids in packing order: the similarity path, or the plan's seeded shuffle."""
    if split == "train" and cfg.order == "similarity":
        return load_rows(layout.order, "train_order")
    return load_rows(layout.plan, f"{split}_order")
