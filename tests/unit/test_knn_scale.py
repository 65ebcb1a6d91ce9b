"""kNN at scale: search_rows over any split of the queries equals search_neighbors, fastscan recall, index files."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from megamoe.config import SimilarityConfig
from megamoe.data.similarity import knn, search
from megamoe.data.similarity.knn import build_index, index_kind, read_index, write_index
from megamoe.data.similarity.search import search_neighbors, search_rows
from megamoe.errors import ConfigError

KINDS = {
    "flat": SimilarityConfig(index="flat"),
    "ivf": SimilarityConfig(index="ivf", nlist=32, nprobe=4),
    "fastscan": SimilarityConfig(index="fastscan", nlist=32, fast_nprobe=4),
}
"""Each kind, forced; IVF probing 4 of 32 lists, so that its answers are approximate."""


def _unit16(x_NK: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, as float16 (what the embedder writes)."""
    return (x_NK / np.linalg.norm(x_NK, axis=1, keepdims=True)).astype(np.float16)


def _clustered(num: int, dim: int, groups: int, noise: float, seed: int = 0) -> np.ndarray:
    """Unit float16 vectors around `groups` random centers."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, dim))
    return _unit16(centers[rng.integers(groups, size=num)] + noise * rng.normal(size=(num, dim)))


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    """3,000 clustered unit vectors; rows 2900..2999 repeat rows 0..99 exactly, so similarities tie."""
    emb_NK = _clustered(3000, 32, 30, 0.8)
    emb_NK[2900:] = emb_NK[:100]
    return emb_NK


@pytest.fixture(scope="module")
def indexes(corpus) -> dict:
    """Each kind's index over the corpus, and search_neighbors' answer."""
    return {
        name: (build_index(cfg, corpus, 0)[0], search_neighbors(cfg, corpus, 0, progress=False))
        for name, cfg in KINDS.items()
    }


def _blocks(index, cfg: SimilarityConfig, emb_NK: np.ndarray, cuts: list[int], k: int = 10):
    """search_rows over the rows cut at `cuts`, concatenated."""
    edges = [0, *cuts, len(emb_NK)]
    parts = [search_rows(cfg, index, emb_NK, slice(a, b), k) for a, b in itertools.pairwise(edges)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("name", KINDS)
def test_any_split_of_the_queries_gives_the_same_neighbors(corpus, indexes, name):
    index, whole = indexes[name]
    cfg = KINDS[name]
    assert whole.index.startswith({"flat": "Flat", "ivf": "IVF32,Flat", "fastscan": "IVF32_HNSW32,PQ32x4fsr"}[name])
    for cuts in ([1, 2, 21, 2000], [7, 1500, 1501, 2999]):
        ids, sims = _blocks(index, cfg, corpus, cuts)
        assert np.array_equal(ids, whole.ids_Nk) and np.array_equal(sims, whole.sims_Nk), cuts
    small = search_neighbors(dataclasses.replace(cfg, batch_size=7), corpus, 0, progress=False)
    assert np.array_equal(small.ids_Nk, whole.ids_Nk) and np.array_equal(small.sims_Nk, whole.sims_Nk)


@pytest.mark.parametrize("name", KINDS)
def test_thread_count_does_not_change_the_neighbors(corpus, indexes, name):
    import faiss

    index, whole = indexes[name]
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        ids, sims = _blocks(index, KINDS[name], corpus, [3, 1000])
    finally:
        faiss.omp_set_num_threads(before)
    assert np.array_equal(ids, whole.ids_Nk) and np.array_equal(sims, whole.sims_Nk)


def test_similarities_are_exact_sorted_and_exclude_self(corpus, indexes):
    _, got = indexes["fastscan"]
    exact_Nk = np.einsum("nd,nkd->nk", corpus.astype(np.float64), corpus[got.ids_Nk].astype(np.float64))
    np.testing.assert_array_equal(got.sims_Nk, exact_Nk.astype(np.float32))
    assert not np.any(got.ids_Nk == np.arange(len(corpus))[:, None])
    order_ok = (np.diff(got.sims_Nk, axis=1) < 0) | ((np.diff(got.sims_Nk, axis=1) == 0) & (np.diff(got.ids_Nk) > 0))
    assert order_ok.all(), "rows sorted by (−similarity, id)"
    twins = got.ids_Nk[:100, 0]  # each of rows 0..99 has an exact copy at 2900.., its nearest neighbor
    np.testing.assert_array_equal(twins, np.arange(2900, 3000))


def _recall(got: np.ndarray, exact_sims_Nk: np.ndarray, sims_Nk: np.ndarray) -> float:
    """Share of found neighbors at least as similar as the exact k-th (ties count as found)."""
    return float(np.mean(sims_Nk >= exact_sims_Nk[:, -1:]))


def test_fastscan_recall_matches_ivf_flat_on_clustered_data():
    emb_NK = _clustered(4000, 32, 20, 0.6, seed=1)
    exact = search_neighbors(SimilarityConfig(index="flat"), emb_NK, 0, progress=False)
    ivf = search_neighbors(SimilarityConfig(index="ivf", nlist=64, nprobe=8), emb_NK, 0, progress=False)
    fast = search_neighbors(SimilarityConfig(index="fastscan", nlist=64, fast_nprobe=8), emb_NK, 0, progress=False)
    one = SimilarityConfig(index="fastscan", nlist=64, fast_nprobe=8, fast_candidates=1)
    bare = search_neighbors(one, emb_NK, 0, progress=False)
    ivf_recall = _recall(ivf.ids_Nk, exact.sims_Nk, ivf.sims_Nk)
    fast_recall = _recall(fast.ids_Nk, exact.sims_Nk, fast.sims_Nk)
    # The same lists probed, so IVF-Flat bounds fastscan; the 4-bit codes may lose a little of it
    assert fast_recall >= ivf_recall - 0.01, (fast_recall, ivf_recall)
    assert _recall(bare.ids_Nk, exact.sims_Nk, bare.sims_Nk) < fast_recall - 0.05, "candidates are what buy recall"


@pytest.mark.parametrize("name", KINDS)
def test_written_and_read_index_searches_the_same(corpus, indexes, name, tmp_path):
    index, whole = indexes[name]
    write_index(index, tmp_path / "index.faiss")
    ids, sims = search_rows(KINDS[name], read_index(tmp_path / "index.faiss"), corpus, slice(500, 1300), 10)
    assert np.array_equal(ids, whole.ids_Nk[500:1300]) and np.array_equal(sims, whole.sims_Nk[500:1300])


def test_auto_picks_fastscan_from_fast_min_documents():
    cfg = SimilarityConfig(exact_max_documents=100, fast_min_documents=5000)
    assert [index_kind(cfg, n) for n in (100, 101, 4999, 5000)] == ["flat", "ivf", "ivf", "fastscan"]
    assert index_kind(SimilarityConfig(), 1_000_000) == "ivf", "today's choice up to 1M documents"
    assert index_kind(SimilarityConfig(index="fastscan"), knn.FAST_MIN_POINTS - 1) == "flat"
    assert [knn._fast_m(k) for k in (64, 32, 384, 100, 7)] == [64, 32, 64, 50, 7]
    assert knn._nlist(SimilarityConfig(), 10_000_000, knn.FAST_MAX_NLIST) == 8192
    with pytest.raises(ConfigError, match="fast_candidates"):
        SimilarityConfig(fast_candidates=0).validate()


def test_tiny_forced_fastscan_falls_back_to_exact():
    emb_NK = _clustered(50, 16, 3, 0.3)
    got = search_neighbors(SimilarityConfig(index="fastscan", k=5), emb_NK, 0, progress=False)
    want = search_neighbors(SimilarityConfig(index="flat", k=5), emb_NK, 0, progress=False)
    assert got.index == "Flat (exact) on cpu" and np.array_equal(got.ids_Nk, want.ids_Nk)


class OtherRounding:
    """A flat index as another CPU's BLAS might round it: each call's float32 inner products moved by
    up to the proven error bound (K + 1)·2⁻²⁴·‖q‖·‖x‖, ties and near-ties ordered by that noise."""

    def __init__(self, emb_NK: np.ndarray, seed: int):
        self.emb_NK, self.ntotal, self.rng = emb_NK.astype(np.float32), len(emb_NK), np.random.default_rng(seed)

    def search(self, x_BK: np.ndarray, k: int):
        exact_BN = (x_BK.astype(np.float64) @ self.emb_NK.T.astype(np.float64)).astype(np.float32)
        norms_BN = np.outer(np.linalg.norm(x_BK, axis=1), np.linalg.norm(self.emb_NK, axis=1))
        bound_BN = (x_BK.shape[1] + 1) * 2.0**-24 * norms_BN
        approx_BN = (exact_BN + self.rng.uniform(-1, 1, exact_BN.shape) * bound_BN).astype(np.float32)
        ids_Bk = np.argsort(-approx_BN, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(approx_BN, ids_Bk, 1), ids_Bk


@pytest.mark.parametrize("margin", [0, search.FLAT_MARGIN])
def test_flat_answer_does_not_depend_on_the_rounding(corpus, indexes, margin, monkeypatch):
    """Any rounding within the bound (a CPU's BLAS kernel, a block size) gives the exact top k, ties by id.

    With no margin the twins (rows 0..99 and 2900..2999) often straddle the fetched candidates, so
    only the certificate's second search finds the exact answer (checked: with it removed, this fails).
    """
    monkeypatch.setattr(search, "FLAT_MARGIN", margin)
    _, whole = indexes["flat"]
    for seed in range(3):
        ids, sims = search_rows(KINDS["flat"], OtherRounding(corpus, seed), corpus, slice(0, 3000), 10)
        assert np.array_equal(ids, whole.ids_Nk) and np.array_equal(sims, whole.sims_Nk), seed


def test_flat_answer_is_the_exact_top_k(corpus, indexes):
    """Against brute force in float64 over all pairs, ties by id (rows 0..99 and 2900..2999 tie)."""
    _, whole = indexes["flat"]
    sims_NN = corpus.astype(np.float64) @ corpus.astype(np.float64).T
    np.fill_diagonal(sims_NN, -np.inf)
    sims32_NN = sims_NN.astype(np.float32)
    ids_NN = np.lexsort((np.broadcast_to(np.arange(3000), sims_NN.shape), -sims32_NN), axis=1)
    assert np.array_equal(whole.ids_Nk, ids_NN[:, :10])
    assert np.array_equal(whole.sims_Nk, np.take_along_axis(sims32_NN, ids_NN[:, :10], 1))
