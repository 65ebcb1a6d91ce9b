"""The document graph and the greedy path through it (In-Context Pretraining, Algorithm 1).

Shape legend: N documents, k neighbors, M directed edges of the symmetric graph.
Edges join each document to its k nearest neighbors, in both directions (undirected), weighted by
cosine similarity. The path starts at an unvisited document of minimum degree (ties broken by a
seeded random order) and repeatedly steps to the unvisited neighbor of highest similarity (ties by
id). When every neighbor is visited it jumps to the next unvisited minimum-degree document. Every
document appears exactly once. Total work is O(N·k): each document's sorted neighbor list is
scanned once, when the path reaches that document. Memory: about 16 bytes per listed neighbor beyond
the inputs (int32 ids and positions, float32 weights, packed uint64 sort keys; no N·k int64 index array),
3.2 GiB peak for 10M documents with k = 10 and int32 ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Graph:
    """Undirected weighted graph in CSR form; each row's neighbors sorted by (−weight, id); int32 ids below 2**31."""

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray

    @property
    def degree(self) -> np.ndarray:
        """Distinct neighbors of each node."""
        return np.diff(self.indptr)


def near_duplicates(ids_Nk: np.ndarray, sims_Nk: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of documents to drop: all but the lowest id of each group of near-duplicates.

    A group is a connected component of the kNN pairs with similarity ≥ threshold, so copies are
    found transitively even when a corpus holds more copies of a text than k (a document's k
    neighbors may then all be other copies, none of them the one that is kept).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    num = len(ids_Nk)
    drop = np.zeros(num, bool)
    if threshold <= 0 or ids_Nk.size == 0:
        return drop
    rows, cols = np.nonzero((sims_Nk >= threshold) & (ids_Nk >= 0))
    pairs = coo_matrix((np.ones(len(rows), np.int8), (rows, ids_Nk[rows, cols])), shape=(num, num))
    _, label_N = connected_components(pairs, directed=False)
    first = np.full(label_N.max() + 1, num)
    np.minimum.at(first, label_N, np.arange(num))
    drop[:] = first[label_N] != np.arange(num)
    return drop


def build_graph(ids_Nk: np.ndarray, sims_Nk: np.ndarray, keep_N: np.ndarray) -> Graph:
    """The symmetric kNN graph over kept documents (ids refer to the original numbering)."""
    num, k = ids_Nk.shape
    ids_flat, sims_flat = ids_Nk.reshape(-1), sims_Nk.reshape(-1)
    fwd_E = _valid_entries(ids_Nk, keep_N)
    rev_E, rev_ptr = _by_neighbor(fwd_E, ids_flat, num)
    fwd_ptr = np.searchsorted(fwd_E, np.arange(num + 1, dtype=np.int64) * k)
    raw_ptr = fwd_ptr + rev_ptr
    indices, weights = np.empty(raw_ptr[-1], _id_dtype(num)), np.empty(raw_ptr[-1], np.float32)
    degree_N, filled = np.zeros(num, np.int64), 0
    for lo, hi in _blocks(raw_ptr):
        fwd, rev = fwd_E[fwd_ptr[lo] : fwd_ptr[hi]], rev_E[rev_ptr[lo] : rev_ptr[hi]]
        src = np.concatenate([fwd // k, ids_flat[rev]]) - lo
        dst = np.concatenate([ids_flat[fwd], rev // k])
        src, dst, w = _sort_block(src, dst, sims_flat[np.concatenate([fwd, rev])].astype(np.float32))
        indices[filled : filled + len(dst)], weights[filled : filled + len(dst)] = dst, w
        degree_N[lo:hi], filled = np.bincount(src, minlength=hi - lo), filled + len(dst)
    del fwd_E, rev_E, fwd_ptr, rev_ptr, raw_ptr
    indices.resize(filled, refcheck=False)  # shrinks in place: the duplicates' room is given back
    weights.resize(filled, refcheck=False)
    return Graph(np.concatenate([[0], np.cumsum(degree_N)]), indices, weights)


BLOCK = 1 << 22
"""Entries (and at most this many rows) handled per numpy step: bounds the temporaries to tens of MB."""
KEY_BITS = 64
"""Width of the packed sort keys (tests lower it to exercise the fallback for huge corpora)."""


def _id_dtype(count: int) -> type:
    """int32 when every index below `count` fits, else int64."""
    return np.int32 if count < 2**31 else np.int64


def _valid_entries(ids_Nk: np.ndarray, keep_N: np.ndarray) -> np.ndarray:
    """Flat positions (ascending) of the listed neighbors that join two different kept documents."""
    num, k = ids_Nk.shape
    rows, parts = max(1, BLOCK // max(k, 1)), [np.zeros(0, _id_dtype(num * k))]
    for lo in range(0, num, rows):
        ids = ids_Nk[lo : lo + rows]
        ok = (ids >= 0) & (ids != np.arange(lo, lo + len(ids))[:, None]) & keep_N[lo : lo + rows, None]
        ok[ok] &= keep_N[ids[ok]]
        parts.append((np.flatnonzero(ok) + lo * k).astype(_id_dtype(num * k)))
    return np.concatenate(parts)


def _by_neighbor(fwd_E: np.ndarray, ids_flat: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries grouped by listed neighbor (ascending within a group), and each group's start (N+1)."""
    shift = max(1, (len(ids_flat) - 1).bit_length())
    if shift + num.bit_length() > KEY_BITS:  # beyond ~2**30 documents: a slower stable argsort
        rev_E = fwd_E[np.argsort(ids_flat[fwd_E], kind="stable")]
        return rev_E, np.searchsorted(ids_flat[rev_E], np.arange(num + 1))
    key_E = np.empty(len(fwd_E), np.uint64)  # (neighbor, flat position): one in-place sort, no index array
    for lo in range(0, len(fwd_E), BLOCK):
        fwd = fwd_E[lo : lo + BLOCK].astype(np.uint64)
        key_E[lo : lo + BLOCK] = (ids_flat[fwd].astype(np.uint64) << np.uint64(shift)) | fwd
    key_E.sort()
    starts = np.searchsorted(key_E, np.arange(num + 1, dtype=np.uint64) << np.uint64(shift))
    rev_E = np.empty_like(fwd_E)
    for lo in range(0, len(fwd_E), BLOCK):
        rev_E[lo : lo + BLOCK] = key_E[lo : lo + BLOCK] & np.uint64((1 << shift) - 1)
    return rev_E, starts


def _blocks(ptr_N1: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of about BLOCK entries (at least one row, at most BLOCK rows) each."""
    num, lo, out = len(ptr_N1) - 1, 0, []
    while lo < num:
        hi = int(np.searchsorted(ptr_N1, ptr_N1[lo] + BLOCK, side="right")) - 1
        hi = max(lo + 1, min(hi, lo + BLOCK, num))
        out.append((lo, hi))
        lo = hi
    return out


def _sort_block(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed edges de-duplicated (the highest weight kept) and sorted by (src, −weight, dst)."""
    shift = max(1, int(dst.max(initial=0)).bit_length())
    key = (src.astype(np.int64) << shift) | dst
    order = np.argsort(key, kind="stable")
    key, w = key[order], w[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    head = np.flatnonzero(first)
    key, w = key[head], np.fmax.reduceat(w, head) if len(head) else w
    order = np.argsort(((key >> shift) << 32) | _descending(w).astype(np.int64), kind="stable")  # stable: ties by dst
    key, w = key[order], w[order]
    return key >> shift, key & ((1 << shift) - 1), w


def _descending(w: np.ndarray) -> np.ndarray:
    """uint32 keys ordering float32 weights high to low: equal floats (±0) equal, NaN last, as a sort on −w."""
    bits = (w + np.float32(0)).view(np.uint32)  # −0 + 0 = +0
    key = np.where(bits >> np.uint32(31), bits, bits ^ np.uint32(0x7FFFFFFF))
    key[np.isnan(w)] = np.uint32(0xFFFFFFFF)
    return key


def greedy_path(graph: Graph, keep_N: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """Every kept document once (min-degree starts, then always the most similar unvisited neighbor),
    and the number of starts (1 + jumps)."""
    tiebreak = np.random.default_rng([seed, 5]).random(len(keep_N))
    starts = np.lexsort((tiebreak, graph.degree))
    starts = starts[keep_N[starts]]
    del tiebreak
    path = np.empty(len(starts), np.int64)
    return path, _walk(starts, graph, bytearray(~keep_N), memoryview(path))


def _walk(starts: np.ndarray, graph: Graph, visited: bytearray, path: memoryview) -> int:
    """Fill `path` greedily (plain Python ints: ~20 neighbors are scanned faster than numpy calls); the run count."""
    ptr, nbrs = memoryview(np.ascontiguousarray(graph.indptr)), memoryview(np.ascontiguousarray(graph.indices))
    filled = runs = 0
    for node in memoryview(starts):
        if visited[node]:
            continue
        runs += 1
        while node >= 0:
            visited[node], path[filled], filled = 1, node, filled + 1
            row, node = nbrs[ptr[node] : ptr[node + 1]], -1
            for nbr in row:
                if not visited[nbr]:
                    node = nbr
                    break
    return runs
