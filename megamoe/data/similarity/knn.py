"""k nearest neighbors of every document with faiss (inner product on unit vectors = cosine).

Shape legend: N documents, K embedding dimensions, k neighbors.
Exact (IndexFlatIP) up to data.similarity.exact_max_documents, IVF or IVF-PQ above (IVF lists,
probes and PQ sub-quantizers configurable); on a GPU when CUDA and faiss-gpu are present. The
returned similarities are recomputed exactly from the embeddings (IVF-PQ only approximates them),
and each row is sorted by similarity, highest first, ties by document id. Memory: the index (N·K
floats, or N·pq_m bytes for IVF-PQ) plus N·k ids and similarities.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from megamoe.config import SimilarityConfig
from megamoe.errors import ConfigError

log = logging.getLogger(__name__)

MIN_POINTS_PER_LIST = 39
"""faiss warns below 39 training points per IVF list."""
TRAIN_POINTS_PER_LIST = 64
"""IVF training sample: this many points per list (capped at N)."""


@dataclass
class Neighbors:
    """Each document's k nearest other documents."""

    ids_Nk: np.ndarray
    """Neighbor ids (int64), −1 where fewer than k were found."""
    sims_Nk: np.ndarray
    """Cosine similarities (float32), −inf where ids is −1."""
    index: str
    """What searched them, e.g. 'IVF1024,Flat nprobe=16 on cpu'."""


def _float32(emb_NK: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Some rows as a contiguous float32 array (faiss's input)."""
    return np.ascontiguousarray(emb_NK[rows], dtype=np.float32)


def index_kind(cfg: SimilarityConfig, num_docs: int) -> str:
    """flat, ivf or ivfpq for this corpus size."""
    if cfg.index != "auto":
        return cfg.index
    return "flat" if num_docs <= cfg.exact_max_documents else "ivf"


def _nlist(cfg: SimilarityConfig, num_docs: int) -> int:
    """IVF lists: configured, or 4·√N, but never fewer than 39 training points per list."""
    want = cfg.nlist or int(4 * math.sqrt(num_docs))
    return max(1, min(want, num_docs // MIN_POINTS_PER_LIST))


def build_index(cfg: SimilarityConfig, emb_NK: np.ndarray, seed: int):
    """A faiss index holding every embedding (trained on a seeded sample for IVF), and its description."""
    import faiss

    num, dim = emb_NK.shape
    kind = index_kind(cfg, num)
    if kind == "flat":
        index, desc = faiss.IndexFlatIP(dim), "Flat (exact)"
    else:
        nlist = _nlist(cfg, num)
        if kind == "ivfpq" and dim % cfg.pq_m:
            raise ConfigError("data.similarity.pq_m", f"({cfg.pq_m}) must divide the embedding dimension ({dim})")
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        quantizer.this.disown()  # the index frees its quantizer; Python must not free it too
        index.own_fields = True
        index.nprobe = min(cfg.nprobe, nlist)
        desc = f"IVF{nlist},{'PQ' + str(cfg.pq_m) if kind == 'ivfpq' else 'Flat'} nprobe={index.nprobe}"
    index, where = _maybe_gpu(index)
    if not index.is_trained:
        rng = np.random.default_rng([seed, 4])
        sample = np.sort(rng.choice(num, min(num, TRAIN_POINTS_PER_LIST * index.nlist), replace=False))
        index.train(_float32(emb_NK, sample))
    for start in range(0, num, cfg.batch_size):
        index.add(_float32(emb_NK, slice(start, start + cfg.batch_size)))
    return index, f"{desc} on {where}"


def _maybe_gpu(index):
    """The index moved to GPU 0 when faiss was built with GPU support and sees a device."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.resources = resources  # keep the resources alive with the index
        return gpu_index, "gpu"
    return index, "cpu"


def search_neighbors(cfg: SimilarityConfig, emb_NK: np.ndarray, seed: int, progress: bool) -> Neighbors:
    """The k = min(data.similarity.k, N − 1) nearest other documents of every document."""
    num = emb_NK.shape[0]
    k = min(cfg.k, num - 1)
    if k < cfg.k:
        log.info("data: %d documents, so %d neighbors each instead of data.similarity.k = %d", num, k, cfg.k)
    if k == 0:
        return Neighbors(np.zeros((num, 0), np.int64), np.zeros((num, 0), np.float32), "none (1 document)")
    index, desc = build_index(cfg, emb_NK, seed)
    log.info("data: kNN with faiss %s, k=%d over %d documents", desc, k, num)
    ids_Nk = np.empty((num, k), np.int64)
    bar = tqdm(total=num, desc="kNN search", unit="doc", disable=not progress)
    for start in range(0, num, cfg.batch_size):
        rows = slice(start, min(start + cfg.batch_size, num))
        _, found = index.search(_float32(emb_NK, rows), k + 1)
        ids_Nk[rows] = _drop_self(found, np.arange(rows.start, rows.stop), k)
        bar.update(rows.stop - rows.start)
    bar.close()
    return Neighbors(*_exact_sorted(emb_NK, ids_Nk, cfg.batch_size), desc)


def _drop_self(found_NK1: np.ndarray, self_N: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row other than the query itself (faiss's −1 padding kept)."""
    is_self = found_NK1 == self_N[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # the query's own id (if found) moves last
    return np.take_along_axis(found_NK1, order, 1)[:, :k].astype(np.int64)


def _exact_sorted(emb_NK: np.ndarray, ids_Nk: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of every (document, neighbor) pair; rows sorted by (−similarity, id)."""
    sims_Nk = np.full(ids_Nk.shape, -np.inf, np.float32)
    for start in range(0, len(ids_Nk), batch):
        rows = slice(start, start + batch)
        ids = ids_Nk[rows]
        valid = ids >= 0
        q_BK = _float32(emb_NK, rows)
        n_BkK = np.asarray(emb_NK[np.where(valid, ids, 0)], dtype=np.float32)
        sims_Nk[rows] = np.where(valid, np.einsum("bd,bkd->bk", q_BK, n_BkK), -np.inf)
    order = np.lexsort((np.where(ids_Nk >= 0, ids_Nk, np.iinfo(np.int64).max), -sims_Nk), axis=1)
    return np.take_along_axis(ids_Nk, order, 1), np.take_along_axis(sims_Nk, order, 1)
