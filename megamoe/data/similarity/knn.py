"""faiss indexes for the k nearest neighbors of every document (inner product on unit vectors = cosine).

Shape legend: N documents, K embedding dimensions, k neighbors, B query rows, F ids fetched per row.
Exact (IndexFlatIP) up to data.similarity.exact_max_documents, IVF-Flat below fast_min_documents,
fastscan from there (ivfpq on request). fastscan is IVF with an HNSW coarse quantizer over 4·√N (at
most 8,192) spherical k-means lists and 4-bit fast-scan PQ codes of the residuals (one code per
dimension up to 64: K/2 bytes a document), whose best fast_candidates·k candidates are re-ranked by
float16 copies of the embeddings (faiss IndexRefine, 2·K bytes a document): 1.7 GB at 10M documents
and K = 64 against IVF-Flat's 2.6 GB, and a scan several times cheaper per query (fewer lists probed,
SIMD look-ups of 4-bit codes instead of float dot products). flat, ivf and ivfpq run on a GPU when
CUDA and faiss-gpu are present; fastscan always runs on the CPU.

Memory: the index. search.py searches it.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


@dataclass
class Neighbors:
    """Each document's k nearest other documents."""

    ids_Nk: np.ndarray
    """Neighbor ids (int64), −1 where fewer than k were found."""
    sims_Nk: np.ndarray
    """Cosine similarities (float32), −inf where ids is −1."""
    index: str
    """What searched them, e.g. 'IVF1024,Flat nprobe=16 on cpu'."""


def float32_rows(emb_NK: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
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
    return float32_rows(emb_NK, np.sort(rng.choice(num, min(num, TRAIN_POINTS_PER_LIST * nlist), replace=False)))


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
        index.add(float32_rows(emb_NK, slice(start, start + step)))
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
