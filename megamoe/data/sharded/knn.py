"""The kNN stages: one faiss index over every training embedding, then neighbors searched per query shard.

The index stage copies the token shards' embeddings into one float16 memmap (N·K·2 bytes: 1.3 GB at
10M documents and K = 64) and builds the index from it exactly as the one-process path does (the
same seeded training sample, the same rows added in the same order). Each search task loads the
index and searches its shard's rows; a query's neighbors depend only on the index and the query,
so the merged lists are the same however the queries were split.
"""

from __future__ import annotations

import json

import numpy as np

from megamoe.config import DataConfig
from megamoe.data.sharded.layout import Layout, num_shards, read_json, shard_rows, stage_output


def neighbor_count(cfg: DataConfig, documents: int) -> int:
    """k = min(data.similarity.k, N − 1): the nearest other documents."""
    return min(cfg.similarity.k, documents - 1)


def _gather_embeddings(layout: Layout, documents: int, size: int, path) -> np.ndarray:
    """Every training shard's embeddings, in order, in one memmap at path."""
    folders = [layout.tokens("train", s) for s in range(num_shards(documents, size))]
    shards = [np.load(folder / "embeddings.npy", mmap_mode="r") for folder in folders]
    emb_NK = np.lib.format.open_memmap(path, "w+", np.float16, (documents, shards[0].shape[1]))
    for s, part in enumerate(shards):
        emb_NK[shard_rows(documents, size, s)] = part
    emb_NK.flush()
    return emb_NK


def run_index(cfg: DataConfig, layout: Layout) -> None:
    """knn/index: the embeddings memmap, the faiss index and its description."""
    documents = read_json(layout.plan / "plan.json")["splits"]["train"]
    from megamoe.data.similarity.knn import build_index, write_index  # faiss: only for a similarity order

    with stage_output(layout.index) as out:
        if out is None:
            return
        emb_NK = _gather_embeddings(layout, documents, cfg.shard_documents, out / "embeddings.npy")
        desc = "none (1 document)"
        if neighbor_count(cfg, documents) > 0:
            index, desc = build_index(cfg.similarity, emb_NK, cfg.seed)
            write_index(index, out / "index.faiss")
        (out / "index.json").write_text(json.dumps({"index": desc}))


def run_search(cfg: DataConfig, layout: Layout, shard: int) -> None:
    """knn/nbrs_NNNNN: ids.npy and sims.npy of one query shard's rows."""
    from megamoe.data.similarity.knn import read_index, to_device
    from megamoe.data.similarity.search import search_rows

    emb_NK = np.load(layout.index / "embeddings.npy", mmap_mode="r")
    k = neighbor_count(cfg, len(emb_NK))
    rows = shard_rows(len(emb_NK), cfg.shard_documents, shard)
    with stage_output(layout.neighbors(shard)) as out:
        if out is None:
            return
        count = rows.stop - rows.start
        ids_Bk, sims_Bk = np.zeros((count, 0), np.int64), np.zeros((count, 0), np.float32)
        if k > 0:
            index = to_device(read_index(layout.index / "index.faiss"))  # GPU faiss when present, as ICP searched
            ids_Bk, sims_Bk = search_rows(cfg.similarity, index, emb_NK, rows, k)
        np.save(out / "ids.npy", ids_Bk.astype(np.int32) if len(emb_NK) < 2**31 else ids_Bk)
        np.save(out / "sims.npy", sims_Bk)
