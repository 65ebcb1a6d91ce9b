"""The memory-lean kNN graph and greedy path give exactly what the original dense implementation gave."""

from __future__ import annotations

import numpy as np
import pytest

from megamoe.data.similarity import graph as graph_mod
from megamoe.data.similarity.graph import Graph, build_graph, greedy_path


def _reference_build_graph(ids_Nk: np.ndarray, sims_Nk: np.ndarray, keep_N: np.ndarray) -> Graph:
    """The original implementation: 2·N·k int64 edges, one lexsort, np.unique over src·N + dst."""
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


def _reference_greedy_path(graph: Graph, keep_N: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """The original implementation: numpy calls per visited node."""
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


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbor lists with −1 padding, self and repeated ids, reciprocal listings, tied similarities, drops."""
    rng = np.random.default_rng(seed)
    num, k = int(rng.integers(1, 201)), int(rng.integers(0, 13))
    local = rng.random() < 0.5  # neighbors near in id, so many pairs are listed from both ends
    ids_Nk = np.arange(num)[:, None] + rng.integers(-4, 5, (num, k)) if local else rng.integers(0, num, (num, k))
    ids_Nk = np.where((ids_Nk < 0) | (ids_Nk >= num) | (rng.random((num, k)) < 0.15), -1, ids_Nk)
    decimals = int(rng.integers(1, 3))
    sim_NN = np.round(rng.uniform(-1, 1, (num, num)), decimals)
    if rng.random() < 0.8:  # the exact cosine: equal from both ends; else each listing has its own value
        sim_NN = np.triu(sim_NN) + np.triu(sim_NN, 1).T
    sims_Nk = np.where(ids_Nk >= 0, sim_NN[np.arange(num)[:, None], ids_Nk], -np.inf)
    keep_N = rng.random(num) >= rng.choice([0.0, 0.1, 0.5])
    id_dtype = rng.choice([np.int32, np.int64])
    return ids_Nk.astype(id_dtype), sims_Nk.astype(rng.choice([np.float32, np.float64])), keep_N


def _assert_same(ids_Nk: np.ndarray, sims_Nk: np.ndarray, keep_N: np.ndarray, seed: int) -> None:
    """Graph arrays, path and run count equal to the reference's, for the same inputs."""
    want, got = _reference_build_graph(ids_Nk, sims_Nk, keep_N), build_graph(ids_Nk, sims_Nk, keep_N)
    assert np.array_equal(got.indptr, want.indptr)
    assert np.array_equal(got.indices, want.indices)
    assert np.array_equal(got.weights, want.weights, equal_nan=True)
    assert got.indptr.dtype == np.int64 and got.weights.dtype == np.float32
    want_path, want_runs = _reference_greedy_path(want, keep_N, seed)
    got_path, got_runs = greedy_path(got, keep_N, seed)
    assert np.array_equal(got_path, want_path) and got_runs == want_runs
    assert got_path.dtype == np.int64


@pytest.mark.parametrize(("block", "key_bits"), [(None, None), (5, None), (16, 1)])
def test_matches_reference_on_random_inputs(monkeypatch, block, key_bits):
    """Many seeded small inputs; also with tiny blocks (many row ranges) and the fallback without packed keys."""
    if block:
        monkeypatch.setattr(graph_mod, "BLOCK", block)
    if key_bits:
        monkeypatch.setattr(graph_mod, "KEY_BITS", key_bits)
    for seed in range(150):
        _assert_same(*_random_case(seed), seed)


def test_matches_reference_with_nan_signed_zero_and_inf():
    """Odd weights keep the reference's order: NaN last, −0 tied with +0, ±inf at the ends."""
    rng = np.random.default_rng(7)
    num, k = 60, 6
    ids_Nk = rng.integers(-1, num, (num, k))
    odd = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 0.5, -0.5], np.float32)
    sims_Nk = np.where(ids_Nk >= 0, rng.choice(odd, (num, k)), -np.inf).astype(np.float32)
    for seed in range(4):
        _assert_same(ids_Nk, sims_Nk, rng.random(num) > 0.2, seed)


def test_matches_reference_on_clustered_knn_lists():
    """A larger faiss-like input: rows sorted by similarity, neighbors mostly reciprocal."""
    rng = np.random.default_rng(3)
    emb_NK = rng.normal(size=(3000, 8)).astype(np.float32)
    emb_NK[:, 0] += np.repeat(np.arange(30), 100)
    emb_NK /= np.linalg.norm(emb_NK, axis=1, keepdims=True)
    ids_Nk = np.empty((3000, 10), np.int64)
    for lo in range(0, 3000, 500):
        sims_BN = emb_NK[lo : lo + 500] @ emb_NK.T
        sims_BN[np.arange(len(sims_BN)), np.arange(lo, lo + len(sims_BN))] = -np.inf
        ids_Nk[lo : lo + 500] = np.argsort(-sims_BN, axis=1, kind="stable")[:, :10]
    sims_Nk = np.einsum("nd,nkd->nk", emb_NK, emb_NK[ids_Nk])
    keep_N = rng.random(3000) > 0.05
    _assert_same(ids_Nk, sims_Nk, keep_N, 0)
    _assert_same(ids_Nk.astype(np.int32), sims_Nk, keep_N, 1)


def test_edge_cases():
    """No documents, no neighbors, nothing kept."""
    for num, k in [(0, 3), (1, 0), (5, 0), (4, 3)]:
        ids_Nk, sims_Nk = np.full((num, k), -1), np.full((num, k), -np.inf, np.float32)
        _assert_same(ids_Nk, sims_Nk, np.ones(num, bool), 0)
    ids_Nk = np.array([[1, 2], [0, 2], [0, 1]])
    _assert_same(ids_Nk, np.ones((3, 2), np.float32), np.zeros(3, bool), 0)
