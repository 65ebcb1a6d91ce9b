"""The document graph and the greedy path through it (In-Context Pretraining, Algorithm 1).

Shape legend: N documents, k neighbors, M directed edges of the symmetric graph.
Edges join each document to its k nearest neighbors, in both directions (undirected), weighted by
cosine similarity. The path starts at an unvisited document of minimum degree (ties broken by a
seeded random order) and repeatedly steps to the unvisited neighbor of highest similarity (ties by
id). When every neighbor is visited it jumps to the next unvisited minimum-degree document. Every
document appears exactly once. Total work is O(N·k): each document's sorted neighbor list is
scanned once, when the path reaches that document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Graph:
    """Undirected weighted graph in CSR form; each row's neighbors sorted by (−weight, id)."""

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
    num = len(ids_Nk)
    rows = np.repeat(np.arange(num), ids_Nk.shape[1])
    cols, weights = ids_Nk.ravel(), sims_Nk.ravel().astype(np.float32)
    valid = (cols >= 0) & (cols != rows)
    valid[valid] &= keep_N[rows[valid]] & keep_N[cols[valid]]
    rows, cols, weights = rows[valid], cols[valid], weights[valid]
    src, dst, w = np.concatenate([rows, cols]), np.concatenate([cols, rows]), np.concatenate([weights, weights])
    order = np.lexsort((dst, -w, src))
    src, dst, w = src[order], dst[order], w[order]
    first = np.ones(len(src), bool)  # drop repeated (src, dst) pairs: both directions were listed
    if len(src):
        pair = src * num + dst
        _, idx = np.unique(pair, return_index=True)
        first[:] = False
        first[idx] = True
    src, dst, w = src[first], dst[first], w[first]
    indptr = np.zeros(num + 1, np.int64)
    np.add.at(indptr, src + 1, 1)
    return Graph(np.cumsum(indptr), dst.astype(np.int64), w)


def greedy_path(graph: Graph, keep_N: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """Every kept document once (min-degree starts, then always the most similar unvisited neighbor),
    and the number of starts (1 + jumps)."""
    num = len(keep_N)
    visited = ~keep_N.copy()
    tiebreak = np.random.default_rng([seed, 5]).random(num)
    starts = np.lexsort((tiebreak, graph.degree))
    starts = starts[keep_N[starts]]
    path = np.empty(int(keep_N.sum()), np.int64)
    indptr, indices = graph.indptr, graph.indices
    filled, next_start, runs = 0, 0, 0
    while filled < len(path):
        while visited[starts[next_start]]:
            next_start += 1
        node, runs = starts[next_start], runs + 1
        while node >= 0:
            visited[node] = True
            path[filled] = node
            filled += 1
            nbrs = indices[indptr[node] : indptr[node + 1]]
            free = np.flatnonzero(~visited[nbrs]) if len(nbrs) else nbrs
            node = nbrs[free[0]] if len(free) else -1
    return path, runs
