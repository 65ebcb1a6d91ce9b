"""Search a knn.py index for each document's k nearest other documents, the same for any split of the queries.

Shape legend: N documents, K embedding dimensions, k neighbors, B query rows, F ids fetched per row,
L IVF lists, P lists probed. The returned similarities are recomputed exactly from the embeddings
(float64: exact for float16 rows), and each row is sorted by similarity, highest first, ties by id.

A query's neighbors depend only on the index and the query: not on which rows share its faiss call,
nor on the CPU. faiss's float32 inner products round differently with the block of queries and the
BLAS kernel (a CI machine's flat search changed with the split), so:
- flat: each row fetches k + 1 + FLAT_MARGIN candidates and re-ranks them exactly. It is accepted
  only when no unfetched document can reach its k-th exact similarity: faiss's last fetched
  similarity plus `slack` (the largest float32 rounding error) lies below it. Otherwise the row
  fetches twice as many. The answer is the exact top k, ties by id, whatever faiss rounded.
- IVF on the CPU: the lists to probe are the exact top nprobe centroids, found the same way from
  faiss's coarse search (search_preassigned then scans them). Within lists faiss scans query by query.
- fastscan: the HNSW quantizer, look-up tables, result handlers and refinement work query by query.
An IVF index on a GPU is searched as faiss does it. Memory: N·k ids and similarities.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from megamoe.config import SimilarityConfig
from megamoe.data.similarity.knn import Neighbors, build_index, float32_rows, index_kind

log = logging.getLogger(__name__)

SEARCH_CHUNK = 2**20
"""search_neighbors: rows per search_rows call (fastscan groups the queries of one call by list)."""
FLAT_MARGIN = 8
"""flat: candidates fetched beyond k + 1, so that a near-tie at the k-th seldom needs a second search."""
NORM_ROWS = 2**16
"""Rows read per block when finding the largest embedding norm."""

Finder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def slack(dim: int, norm_q_B: np.ndarray, norm_max: float) -> np.ndarray:
    """Bound on |faiss's float32 inner product − the float32-cast exact one| for each query row.

    A float32 dot product of K terms errs by at most K·2⁻²⁴·Σ|q_i·x_i| ≤ K·2⁻²⁴·‖q‖·‖x‖ (products
    rounded once, sums K − 1 times, in any order or blocking), and casting the exact value to float32
    errs by 2⁻²⁴·‖q‖·‖x‖ more: (K + 1)·2⁻²⁴. (K + 2)·2⁻²³ is that with a factor of 2 to spare.
    """
    return (dim + 2) * 2.0**-23 * norm_q_B * norm_max


def _norm_max(emb_NK: np.ndarray) -> float:
    """The largest row norm of emb_NK (float64), read in blocks."""
    blocks = (np.asarray(emb_NK[i : i + NORM_ROWS], np.float64) for i in range(0, len(emb_NK), NORM_ROWS))
    return float(np.sqrt(max(float(np.einsum("nd,nd->n", x, x).max()) for x in blocks)))


def _drop_self(found_BF: np.ndarray, self_B: np.ndarray, width: int) -> np.ndarray:
    """The first `width` ids of each row, the query's own id (if found) replaced by −1 and moved last."""
    is_self = found_BF == self_B[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(np.where(is_self, -1, found_BF), order, 1)[:, :width].astype(np.int64)


def _exact_sorted(q_BK: np.ndarray, emb_NK: np.ndarray, ids_Bk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner product of each (query, emb_NK[id]) pair (float64: exact for float16 and float32 rows);
    sorted by (−sim, id), −1 ids last."""
    valid = ids_Bk >= 0
    q_BK = np.asarray(q_BK, dtype=np.float64)
    n_BkK = np.asarray(emb_NK[np.where(valid, ids_Bk, 0)], dtype=np.float64)
    sims_Bk = np.where(valid, np.einsum("bd,bkd->bk", q_BK, n_BkK), -np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, ids_Bk, np.iinfo(np.int64).max), -sims_Bk), axis=1)
    return np.take_along_axis(ids_Bk, order, 1), np.take_along_axis(sims_Bk, order, 1)


def _certain_top(search, exact, x_BK: np.ndarray, k: int, fetch: int, total: int, slack_B: np.ndarray):
    """The exact top k of each row: search(x, F)'s candidates ranked by exact(rows, ids), F doubled until sure.

    A row is sure when faiss's last fetched similarity plus slack_B lies below its k-th exact one: no
    unfetched candidate can then reach the k-th (or when all `total` candidates were fetched).
    """
    ids_Bk, sims_Bk = np.empty((len(x_BK), k), np.int64), np.empty((len(x_BK), k), np.float32)
    todo_T = np.arange(len(x_BK))
    while len(todo_T):
        fetch = min(fetch, total)
        approx_TF, found_TF = search(x_BK[todo_T], fetch)
        ids_TF, sims_TF = exact(todo_T, found_TF)
        sure_T = (fetch == total) | (approx_TF[:, -1] + slack_B[todo_T] < sims_TF[:, k - 1])
        ids_Bk[todo_T[sure_T]], sims_Bk[todo_T[sure_T]] = ids_TF[sure_T, :k], sims_TF[sure_T, :k]
        todo_T, fetch = todo_T[~sure_T], 2 * fetch
    return ids_Bk, sims_Bk


def _row_slack(x_BK: np.ndarray, norm_max: float) -> np.ndarray:
    """slack for each query row against candidates of norm at most norm_max."""
    return slack(x_BK.shape[1], np.linalg.norm(x_BK.astype(np.float64), axis=1), norm_max)


def _flat_finder(index, emb_NK: np.ndarray, k: int) -> Finder:
    """Exact top k of each row from a flat index, fetching more candidates until no other can reach the k-th."""
    norm_max = _norm_max(emb_NK)

    def find(rows_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_BK = float32_rows(emb_NK, rows_B)

        def exact(todo_T: np.ndarray, found_TF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _exact_sorted(x_BK[todo_T], emb_NK, _drop_self(found_TF, rows_B[todo_T], found_TF.shape[1]))

        fetch = k + 1 + FLAT_MARGIN
        return _certain_top(index.search, exact, x_BK, k, fetch, index.ntotal, _row_slack(x_BK, norm_max))

    return find


def _ivf_finder(index, emb_NK: np.ndarray, k: int) -> Finder:
    """Top k of each row from a CPU IVF index whose probed lists are the exact top nprobe (as the flat search)."""
    import faiss

    quantizer = faiss.downcast_index(index.quantizer)
    cent_LK = quantizer.reconstruct_n(0, index.nlist)
    norm_max, nprobe = _norm_max(cent_LK), min(index.nprobe, index.nlist)

    def find(rows_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_BK = float32_rows(emb_NK, rows_B)

        def exact(todo_T: np.ndarray, lists_TF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _exact_sorted(x_BK[todo_T], cent_LK, lists_TF)

        fetch = nprobe + FLAT_MARGIN
        lists_BP, list_sims_BP = _certain_top(
            quantizer.search, exact, x_BK, nprobe, fetch, index.nlist, _row_slack(x_BK, norm_max)
        )
        _, found_BF = index.search_preassigned(x_BK, k + 1, lists_BP, list_sims_BP)
        return _exact_sorted(x_BK, emb_NK, _drop_self(found_BF, rows_B, k))

    return find


def _faiss_finder(cfg: SimilarityConfig, index, emb_NK: np.ndarray, k: int) -> Finder:
    """Top k of each row as faiss searches it (fastscan: fast_candidates·k candidates re-ranked in float16)."""
    import faiss

    params = None
    if isinstance(index, faiss.IndexRefine):
        params = faiss.IndexRefineSearchParameters(k_factor=max(1.0, cfg.fast_candidates * k / (k + 1)))

    def find(rows_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_BK = float32_rows(emb_NK, rows_B)
        _, found_BF = index.search(x_BK, k + 1, params=params)
        return _exact_sorted(x_BK, emb_NK, _drop_self(found_BF, rows_B, k))

    return find


def _finder(cfg: SimilarityConfig, index, emb_NK: np.ndarray, k: int) -> Finder:
    """How this index's rows are searched: certified flat, IVF with certified lists, or faiss as is."""
    import faiss

    if index_kind(cfg, index.ntotal) == "flat":
        return _flat_finder(index, emb_NK, k)
    if isinstance(index, faiss.IndexIVF):
        return _ivf_finder(index, emb_NK, k)
    return _faiss_finder(cfg, index, emb_NK, k)


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
    find = _finder(cfg, index, emb_NK, k)
    for first in range(0, len(order_B), cfg.batch_size):
        out = order_B[first : first + cfg.batch_size]
        ids_Bk[out], sims_Bk[out] = find(start + out)
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
