"""k nearest neighbors of every document with faiss (inner product on unit vectors = cosine).

Shape legend: N documents, K embedding dimensions, k neighbors, B query rows, F ids fetched per row.
Exact (IndexFlatIP) up to data.similarity.exact_max_documents, IVF-Flat below fast_min_documents,
fastscan from there (ivfpq on request). fastscan is IVF with an HNSW coarse quantizer over 4·√N (at
most 8,192) spherical k-means lists and 4-bit fast-scan PQ codes of the residuals (one code per
dimension up to 64: K/2 bytes a document), whose best fast_candidates·k candidates are re-ranked by
float16 copies of the embeddings (faiss IndexRefine, 2·K bytes a document): 1.7 GB at 10M documents
and K = 64 against IVF-Flat's 2.6 GB, and a scan several times cheaper per query (fewer lists probed,
SIMD look-ups of 4-bit codes instead of float dot products). flat, ivf and ivfpq run on a GPU when
CUDA and faiss-gpu are present; fastscan always runs on the CPU. The returned similarities are
recomputed exactly from the embeddings (in float64, exact for float16 rows), and each row is sorted by
similarity, highest first, ties by document id.

A query's neighbors depend only on the index and the query, not on which other rows share its faiss
call: flat and IVF blocks are padded so that faiss's flat distances (the exact index, the IVF coarse
quantizer) always take the BLAS path (below a size threshold faiss switches to kernels that round
differently), and fastscan's HNSW quantizer, look-up tables, result handlers and refinement work
query by query. Memory: the index plus N·k ids and similarities.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from megamoe.config import SimilarityConfig
from megamoe.errors import ConfigError

log = logging.getLogger(__name__)

MIN_POINTS_PER_LIST = 39
"""faiss warns below 39 training points per IVF list."""
TRAIN_POINTS_PER_LIST = 64
"""IVF training sample: this many points per list (capped at N)."""
FAST_MAX_NLIST = 8192
"""fastscan: at most this many lists (k-means training time grows as lists²)."""
FAST_MIN_POINTS = 1000
"""fastscan on fewer documents falls back to the exact index (4-bit PQ training wants ≥ 624 points)."""
FAST_MAX_M = 64
"""fastscan: at most this many 4-bit PQ codes per document."""
HNSW_M = 32
"""fastscan: links per centroid in the HNSW coarse quantizer."""
ADD_ROWS = 65536
"""Rows added to the index per call (fewer calls: faster fast-scan packing)."""
SEARCH_CHUNK = 2**20
"""search_neighbors: rows per search_rows call (fastscan groups the queries of one call by list)."""


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
    """flat, ivf, ivfpq or fastscan for this corpus size."""
    kind = cfg.index
    if kind == "auto":
        kind = "flat" if num_docs <= cfg.exact_max_documents else "ivf"
        kind = "fastscan" if num_docs >= cfg.fast_min_documents else kind
    return "flat" if kind == "fastscan" and num_docs < FAST_MIN_POINTS else kind


def _nlist(cfg: SimilarityConfig, num_docs: int, most: int | None = None) -> int:
    """IVF lists: configured, or 4·√N (at most `most`), but never fewer than 39 training points per list."""
    want = cfg.nlist or min(int(4 * math.sqrt(num_docs)), most or num_docs)
    return max(1, min(want, num_docs // MIN_POINTS_PER_LIST))


def _train_sample(emb_NK: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """A seeded sample of 64 rows per list (at most all N), in row order, as float32."""
    num = emb_NK.shape[0]
    rng = np.random.default_rng([seed, 4])
    return _float32(emb_NK, np.sort(rng.choice(num, min(num, TRAIN_POINTS_PER_LIST * nlist), replace=False)))


def build_index(cfg: SimilarityConfig, emb_NK: np.ndarray, seed: int):
    """A faiss index holding every embedding (trained on a seeded sample for IVF), and its description."""
    import faiss

    num, dim = emb_NK.shape
    kind = index_kind(cfg, num)
    if kind == "fastscan":
        index, desc = _fastscan_index(cfg, emb_NK, seed)
        where = "cpu"
    else:
        index, desc = faiss.IndexFlatIP(dim), "Flat (exact)"
        if kind != "flat":
            index, desc = _ivf_index(cfg, kind, num, dim)
        index, where = _maybe_gpu(index)
        if not index.is_trained:
            index.train(_train_sample(emb_NK, index.nlist, seed))
    step = max(cfg.batch_size, ADD_ROWS)
    for start in range(0, num, step):
        index.add(_float32(emb_NK, slice(start, start + step)))
    return index, f"{desc} on {where}"


def _ivf_index(cfg: SimilarityConfig, kind: str, num: int, dim: int):
    """An untrained IVF-Flat or IVF-PQ index with an exact coarse quantizer, and its description."""
    import faiss

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
    return index, f"IVF{nlist},{'PQ' + str(cfg.pq_m) if kind == 'ivfpq' else 'Flat'} nprobe={index.nprobe}"


def _fast_m(dim: int) -> int:
    """4-bit PQ sub-quantizers: the largest divisor of K up to 64 (one per dimension at K ≤ 64)."""
    return next(m for m in range(min(dim, FAST_MAX_M), 0, -1) if dim % m == 0)


def _fastscan_index(cfg: SimilarityConfig, emb_NK: np.ndarray, seed: int):
    """A trained, empty fastscan index (IVF-HNSW, 4-bit PQ of residuals, float16 refinement) and its description."""
    import faiss

    dim = emb_NK.shape[1]
    nlist = _nlist(cfg, emb_NK.shape[0], FAST_MAX_NLIST)
    sample_SK = _train_sample(emb_NK, nlist, seed)
    quantizer = _hnsw_centroids(sample_SK, nlist, seed, max(16, 2 * cfg.fast_nprobe))
    ivf = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, _fast_m(dim), 4, faiss.METRIC_INNER_PRODUCT)
    ivf.by_residual = True
    ivf.nprobe = min(cfg.fast_nprobe, nlist)
    with _one_thread():  # the quantizer is full, so this trains the small PQ codebooks only: many tiny
        ivf.train(sample_SK)  # OpenMP regions, which crawl when other processes hold the cores
    refine = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefine(ivf, refine)
    quantizer.this.disown()  # each owner frees what it holds; Python must not free them too
    ivf.this.disown()
    refine.this.disown()
    ivf.own_fields = index.own_fields = index.own_refine_index = True
    desc = f"IVF{nlist}_HNSW{HNSW_M},PQ{_fast_m(dim)}x4fsr nprobe={ivf.nprobe},Refine(SQfp16) x{cfg.fast_candidates}"
    return index, desc


def _hnsw_centroids(sample_SK: np.ndarray, nlist: int, seed: int, ef_search: int):
    """An HNSW index over nlist seeded spherical k-means centroids of the sample."""
    import faiss

    kmeans = faiss.Kmeans(sample_SK.shape[1], nlist, niter=10, seed=seed, spherical=True, max_points_per_centroid=256)
    kmeans.train(sample_SK)
    quantizer = faiss.IndexHNSWFlat(sample_SK.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    with _one_thread():  # parallel insertion makes the graph depend on thread timing
        quantizer.add(kmeans.centroids)
    quantizer.hnsw.efSearch = ef_search
    return quantizer


@contextmanager
def _one_thread():
    """faiss's OpenMP pool limited to one thread inside the block."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _maybe_gpu(index):
    """The index moved to GPU 0 when faiss was built with GPU support and sees a device."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.resources = resources  # keep the resources alive with the index
        return gpu_index, "gpu"
    return index, "cpu"


def write_index(index, path: Path) -> None:
    """Save an index to path (a GPU index is copied to the CPU first)."""
    import faiss

    if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex):
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(path))


def read_index(path: Path):
    """An index saved by write_index, on the CPU."""
    import faiss

    return faiss.read_index(str(path))


def to_device(index):
    """A flat or IVF index moved to GPU 0 when faiss-gpu sees one (fastscan stays on the CPU)."""
    import faiss

    return index if isinstance(index, faiss.IndexRefine) else _maybe_gpu(index)[0]


def _blas_rows(dim: int) -> int:
    """Fewest query rows per faiss call that keep every thread's flat distances on faiss's BLAS path."""
    import faiss

    threshold = faiss.cvar.distance_compute_blas_threshold  # faiss ≥ 1.10 compares rows·K with it, older rows
    return max(-(-threshold // dim), 20) * faiss.omp_get_max_threads()


def _search(cfg: SimilarityConfig, index, x_BK: np.ndarray, fetch: int) -> np.ndarray:
    """The ids faiss finds for each row (flat and IVF: the block padded with repeated rows to the BLAS minimum)."""
    import faiss

    params = None
    if isinstance(index, faiss.IndexRefine):  # fastscan: fast_candidates·k candidates from the 4-bit codes
        params = faiss.IndexRefineSearchParameters(k_factor=max(1.0, cfg.fast_candidates * (fetch - 1) / fetch))
    else:
        x_BK = np.resize(x_BK, (max(_blas_rows(x_BK.shape[1]), len(x_BK)), x_BK.shape[1]))  # pad i = row i mod B
    _, found_BF = index.search(x_BK, fetch, params=params)
    return found_BF


def _query_order(index, start: int, stop: int) -> np.ndarray:
    """Offsets of rows start..stop−1 in search order: fastscan groups them by IVF list (~2× faster blocks)."""
    import faiss

    if not isinstance(index, faiss.IndexRefine):
        return np.arange(stop - start)
    invlists = faiss.extract_index_ivf(index).invlists
    list_B = np.zeros(stop - start, np.int32)
    for lst in range(invlists.nlist):
        if size := invlists.list_size(lst):
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
            list_B[ids[(ids >= start) & (ids < stop)] - start] = lst
    return np.argsort(list_B, kind="stable")


def search_rows(cfg: SimilarityConfig, index, emb_NK: np.ndarray, rows: slice, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other documents of emb_NK[rows] in index: ids (int64) and exact sims, sorted by (−sim, id)."""
    start, stop, _ = rows.indices(emb_NK.shape[0])
    order_B = _query_order(index, start, max(start, stop))
    ids_Bk = np.empty((len(order_B), k), np.int64)
    sims_Bk = np.empty((len(order_B), k), np.float32)
    step = max(cfg.batch_size, _blas_rows(emb_NK.shape[1]))
    for first in range(0, len(order_B), step):
        out = order_B[first : first + step]
        found = _search(cfg, index, _float32(emb_NK, start + out), k + 1)[: len(out)]
        ids_Bk[out], sims_Bk[out] = _exact_sorted(emb_NK, start + out, _drop_self(found, start + out, k))
    return ids_Bk, sims_Bk


def search_neighbors(cfg: SimilarityConfig, emb_NK: np.ndarray, seed: int, progress: bool) -> Neighbors:
    """The k = min(data.similarity.k, N − 1) nearest other documents of every document."""
    num = emb_NK.shape[0]
    k = min(cfg.k, num - 1)
    if k < cfg.k:
        log.info("data: %d documents, so %d neighbors each instead of data.similarity.k = %d", num, k, cfg.k)
    if k == 0:
        return Neighbors(np.zeros((num, 0), np.int64), np.zeros((num, 0), np.float32), "none (1 document)")
    clock = time.perf_counter()
    index, desc = build_index(cfg, emb_NK, seed)
    log.info("data: kNN with faiss %s, k=%d over %d documents", desc, k, num)
    log.info("data: kNN index built in %.1f s", time.perf_counter() - clock)
    clock = time.perf_counter()
    ids_Nk = np.empty((num, k), np.int64)
    sims_Nk = np.empty((num, k), np.float32)
    bar = tqdm(total=num, desc="kNN search", unit="doc", disable=not progress)
    for start in range(0, num, SEARCH_CHUNK):
        rows = slice(start, min(start + SEARCH_CHUNK, num))
        ids_Nk[rows], sims_Nk[rows] = search_rows(cfg, index, emb_NK, rows, k)
        bar.update(rows.stop - rows.start)
    bar.close()
    log.info("data: kNN searched in %.1f s", time.perf_counter() - clock)
    return Neighbors(ids_Nk, sims_Nk, desc)


def _drop_self(found_BF: np.ndarray, self_B: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row other than the query itself (faiss's −1 padding kept)."""
    is_self = found_BF == self_B[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # the query's own id (if found) moves last
    return np.take_along_axis(found_BF, order, 1)[:, :k].astype(np.int64)


def _exact_sorted(emb_NK: np.ndarray, rows: np.ndarray, ids_Bk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each (query row, neighbor) pair (float64: exact for float16 rows); sorted by (−sim, id)."""
    valid = ids_Bk >= 0
    q_BK = np.asarray(emb_NK[rows], dtype=np.float64)
    n_BkK = np.asarray(emb_NK[np.where(valid, ids_Bk, 0)], dtype=np.float64)
    sims_Bk = np.where(valid, np.einsum("bd,bkd->bk", q_BK, n_BkK), -np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, ids_Bk, np.iinfo(np.int64).max), -sims_Bk), axis=1)
    return np.take_along_axis(ids_Bk, order, 1), np.take_along_axis(sims_Bk, order, 1)
