"""Similarity ordering of documents (In-Context Pretraining, as Lory uses it, arXiv 2405.03133 §3.2).

embed (hashing TF-IDF + SVD, or a local sentence-transformers model) → faiss kNN → optional
near-duplicate removal → greedy maximum-similarity path through the kNN graph → the order in
which documents are packed. `order_documents` runs the stages, times them, and reports how much
more similar adjacent documents are than in a random order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from megamoe.config import SimilarityConfig
from megamoe.data.similarity.embed import TextBatches, embed_documents
from megamoe.data.similarity.graph import build_graph, greedy_path, near_duplicates
from megamoe.data.similarity.knn import Neighbors
from megamoe.data.similarity.report import quality_report
from megamoe.data.similarity.search import search_neighbors

log = logging.getLogger(__name__)

__all__ = ["order_documents", "order_from_neighbors"]


def order_documents(
    cfg: SimilarityConfig,
    texts: TextBatches,
    domain_N: np.ndarray,
    workdir: Path,
    seed: int,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """Positions 0..N−1 of the documents in path order (near-duplicates left out), and the report."""
    num = len(domain_N)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[stage] = round(now - clock, 3)
        clock = now

    emb_NK = embed_documents(cfg, texts, num, workdir / "embeddings.npy", seed, progress)
    lap("embed_s")
    nbrs = search_neighbors(cfg, emb_NK, seed, progress)
    lap("knn_s")
    path, report = order_from_neighbors(cfg, nbrs, emb_NK, domain_N, seed)
    lap("traverse_s")
    np.save(workdir / "order.npy", path)
    return path, {**report, "seconds": times}


def order_from_neighbors(
    cfg: SimilarityConfig, nbrs: Neighbors, emb_NK: np.ndarray, domain_N: np.ndarray, seed: int
) -> tuple[np.ndarray, dict]:
    """Near-duplicates dropped, the greedy path through the kNN graph, and the report (no timings)."""
    drop_N = near_duplicates(nbrs.ids_Nk, nbrs.sims_Nk, cfg.dedup_threshold)
    graph = build_graph(nbrs.ids_Nk, nbrs.sims_Nk, ~drop_N)
    path, runs = greedy_path(graph, ~drop_N, seed)
    report = {
        "embedder": cfg.embedder,
        "dim": int(emb_NK.shape[1]),
        "index": nbrs.index,
        "k": int(nbrs.ids_Nk.shape[1]),
        "documents": len(domain_N),
        "near_duplicates_dropped": int(drop_N.sum()),
        "path_runs": runs,
        **quality_report(emb_NK, domain_N, path, seed),
    }
    log.info(
        "data: similarity order of %d documents (%d near-duplicates dropped): adjacent cosine %.3f vs %.3f random, "
        "same domain %.3f vs %.3f random",
        len(path), report["near_duplicates_dropped"], report["adjacent_cosine"], report["adjacent_cosine_random"],
        report["adjacent_same_domain"], report["adjacent_same_domain_random"],
    )  # fmt: skip
    return path, report
