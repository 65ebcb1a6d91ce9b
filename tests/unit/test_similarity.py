"""Similarity ordering: kNN against brute force, the greedy path step by step, dedup, prepare end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megamoe.config import SimilarityConfig, load_config
from megamoe.data import prepare_data
from megamoe.data.prepare import cache_key
from megamoe.data.similarity import order_documents
from megamoe.data.similarity.embed import TfidfSvdEmbedder
from megamoe.data.similarity.graph import build_graph, greedy_path, near_duplicates
from megamoe.data.similarity.search import search_neighbors
from megamoe.errors import ConfigError, DataError
from tests.util import tiny_config


def _unit(x_NK: np.ndarray) -> np.ndarray:
    return (x_NK / np.linalg.norm(x_NK, axis=1, keepdims=True)).astype(np.float32)


def _clusters(num: int, dim: int, groups: int, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    """Unit vectors around `groups` random centers."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, dim))
    return _unit(centers[rng.integers(groups, size=num)] + noise * rng.normal(size=(num, dim)))


def _brute_force(emb_NK: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k other documents by cosine, sorted by (−similarity, id): the obvious O(N²) reference."""
    sims_NN = emb_NK @ emb_NK.T
    np.fill_diagonal(sims_NN, -np.inf)
    ids = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in sims_NN])
    return ids, np.take_along_axis(sims_NN, ids, 1)


def _check_greedy_steps(ids_Nk, sims_Nk, keep_N, path):
    """Every step goes to the most similar unvisited neighbor, or, when none is left, to a min-degree node."""
    nbrs: dict[int, dict[int, float]] = {int(i): {} for i in np.flatnonzero(keep_N)}
    for a, row in enumerate(ids_Nk):
        for b, s in zip(row, sims_Nk[a], strict=True):
            if b >= 0 and b != a and keep_N[a] and keep_N[b]:
                nbrs[a][int(b)] = nbrs[int(b)][a] = float(s)
    assert sorted(path.tolist()) == sorted(nbrs), "the path must visit every kept document exactly once"
    degree = {a: len(n) for a, n in nbrs.items()}
    unvisited = set(nbrs)
    assert degree[int(path[0])] == min(degree.values())
    unvisited.discard(int(path[0]))
    for a, b in zip(path[:-1].tolist(), path[1:].tolist(), strict=True):
        free = {c: s for c, s in nbrs[a].items() if c in unvisited}
        if free:
            best = max(free.values())
            assert b == min(c for c, s in free.items() if s == best), f"step {a}->{b} is not the best neighbor"
        else:
            assert degree[b] == min(degree[c] for c in unvisited), f"jump {a}->{b} is not to a min-degree node"
        unvisited.discard(b)


def test_hand_built_graph_path():
    """Edges 0-1 .9, 1-3 .85, 1-2 .8, 2-3 .7, 3-4 .6: from either min-degree end the greedy path is forced."""
    ninf = -np.inf
    ids_Nk = np.array([[1, -1], [0, 3], [1, 3], [1, 2], [3, -1]])
    sims_Nk = np.array([[0.9, ninf], [0.9, 0.85], [0.8, 0.7], [0.85, 0.7], [0.6, ninf]], np.float32)
    keep_N = np.ones(5, bool)
    graph = build_graph(ids_Nk, sims_Nk, keep_N)
    np.testing.assert_array_equal(graph.degree, [1, 3, 2, 3, 1])
    np.testing.assert_array_equal(graph.indices[graph.indptr[1] : graph.indptr[2]], [0, 3, 2])
    seen = set()
    for seed in range(8):
        path, runs = greedy_path(graph, keep_N, seed)
        seen.add(tuple(path.tolist()))
        assert runs == 2
    assert seen == {(0, 1, 3, 2, 4), (4, 3, 1, 0, 2)}, "the seed breaks the tie between the two min-degree starts"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_path_on_random_graphs(seed):
    emb_NK = _clusters(300, 12, 6, seed)
    cfg = SimilarityConfig(k=5, dedup_threshold=0.97)
    nbrs = search_neighbors(cfg, emb_NK, seed, progress=False)
    for threshold in (0.0, 0.97):
        drop_N = near_duplicates(nbrs.ids_Nk, nbrs.sims_Nk, threshold)
        path, runs = greedy_path(build_graph(nbrs.ids_Nk, nbrs.sims_Nk, ~drop_N), ~drop_N, seed)
        _check_greedy_steps(nbrs.ids_Nk, nbrs.sims_Nk, ~drop_N, path)
        assert 1 <= runs < len(path)


def test_flat_and_ivf_match_brute_force():
    emb_NK = _clusters(400, 16, 8)
    want_ids, want_sims = _brute_force(emb_NK, 7)
    flat = search_neighbors(SimilarityConfig(k=7, index="flat"), emb_NK, 0, progress=False)
    np.testing.assert_array_equal(flat.ids_Nk, want_ids)
    np.testing.assert_allclose(flat.sims_Nk, want_sims, atol=1e-6)
    assert flat.index == "Flat (exact) on cpu"
    ivf = search_neighbors(SimilarityConfig(k=7, index="ivf", nlist=8, nprobe=8), emb_NK, 0, progress=False)
    np.testing.assert_array_equal(ivf.ids_Nk, want_ids)  # every list probed: exact
    assert ivf.index.startswith("IVF8,Flat nprobe=8")


def test_ivfpq_recall_and_exact_similarities():
    emb_NK = _clusters(2000, 16, 10, noise=0.5)
    want_ids, _ = _brute_force(emb_NK, 10)
    cfg = SimilarityConfig(k=10, index="ivfpq", nlist=16, nprobe=4, pq_m=4)
    got = search_neighbors(cfg, emb_NK, 0, progress=False)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.ids_Nk, want_ids, strict=True)])
    assert recall > 0.5, recall
    exact = np.einsum("nd,nkd->nk", emb_NK, emb_NK[got.ids_Nk])
    np.testing.assert_allclose(got.sims_Nk, exact, atol=1e-5)  # re-ranked by exact cosine, not PQ estimates
    assert np.all(np.diff(got.sims_Nk, axis=1) <= 0)
    with pytest.raises(ConfigError, match=r"data.similarity.pq_m: \(5\) must divide the embedding dimension \(16\)"):
        search_neighbors(SimilarityConfig(index="ivfpq", pq_m=5), emb_NK, 0, progress=False)


def test_near_duplicates_keep_the_first_copy():
    rng = np.random.default_rng(0)
    base_NK = _unit(rng.normal(size=(50, 32)))
    copies = _unit(base_NK[:10] + 1e-3 * rng.normal(size=(10, 32)))
    emb_NK = np.concatenate([base_NK, base_NK[10:20], copies])  # rows 50..69 duplicate rows 10..19 and 0..9
    nbrs = search_neighbors(SimilarityConfig(k=4), emb_NK, 0, progress=False)
    drop_N = near_duplicates(nbrs.ids_Nk, nbrs.sims_Nk, 0.99)
    np.testing.assert_array_equal(np.flatnonzero(drop_N), np.arange(50, 70))
    assert not near_duplicates(nbrs.ids_Nk, nbrs.sims_Nk, 0.0).any()


def _order(texts: list[str], domain_N, tmp_path, **kw):
    cfg = SimilarityConfig(batch_size=7, **kw)

    def batches(rows):
        chosen = texts if rows is None else [texts[i] for i in rows]
        for start in range(0, len(chosen), cfg.batch_size):
            yield chosen[start : start + cfg.batch_size]

    return order_documents(cfg, batches, np.asarray(domain_N), tmp_path, seed=3, progress=False)


def test_tfidf_embeddings_separate_topics(tmp_path):
    words = {"fruit": "apple banana cherry grape lemon mango", "space": "orbit rocket planet comet moon star"}
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words[t].split(), 12)) for t in ("fruit", "space") for _ in range(20)]
    path, report = _order(texts, [0] * 20 + [1] * 20, tmp_path, dim=8)
    emb_NK = np.load(tmp_path / "embeddings.npy")
    assert emb_NK.dtype == np.float16 and emb_NK.shape == (40, 8)
    np.testing.assert_allclose(np.linalg.norm(emb_NK.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert sorted(path) == list(range(40)) and report["path_runs"] >= 1
    assert report["adjacent_same_domain"] >= 0.9 > 0.7 > report["adjacent_same_domain_random"]
    assert report["adjacent_cosine"] > report["adjacent_cosine_random"] + 0.3
    (tmp_path / "again").mkdir()
    again, _ = _order(texts, [0] * 20 + [1] * 20, tmp_path / "again", dim=8)
    np.testing.assert_array_equal(again, path)
    embedder = TfidfSvdEmbedder(SimilarityConfig(dim=8), seed=3)
    embedder.fit(lambda rows: iter([texts]), 40)
    np.testing.assert_allclose(embedder(texts[:3]), emb_NK[:3].astype(np.float32), atol=2e-3)


def test_degenerate_corpora(tmp_path):
    """All duplicates, no word characters, fewer documents than k, a single document: handled, documented."""
    (tmp_path / "a").mkdir()
    path, report = _order(["same text here"] * 12, [0] * 12, tmp_path / "a", k=10, dedup_threshold=0.99)
    assert report["near_duplicates_dropped"] == 11 and len(path) == 1
    (tmp_path / "b").mkdir()
    path, report = _order(["!!!", "??", "...", "%"], [0, 0, 1, 1], tmp_path / "b", k=10)
    assert sorted(path) == [0, 1, 2, 3] and report["k"] == 3 and np.isfinite(report["adjacent_cosine"])
    (tmp_path / "c").mkdir()
    path, report = _order(["just one"], [0], tmp_path / "c")
    assert path.tolist() == [0] and report["k"] == 0


def _similarity_cfg(cache, *extra):
    return tiny_config(cache, None, "data.max_documents=400", "data.order=similarity", *extra).data


@pytest.fixture(scope="module")
def ordered(tmp_path_factory):
    """The embedded corpus (400 documents) prepared in random and in similarity order."""
    cache = tmp_path_factory.mktemp("sim_cache")
    random = prepare_data(tiny_config(cache, None, "data.max_documents=400").data, progress=False)
    return random, prepare_data(_similarity_cfg(cache), progress=False), cache


def test_embedded_corpus_order_beats_random(ordered):
    random, similar, _ = ordered
    report = similar.manifest["similarity"]
    assert report["adjacent_cosine"] > report["adjacent_cosine_random"] + 0.3, report
    assert report["adjacent_same_domain"] > report["adjacent_same_domain_random"] + 0.3, report
    assert report["index"] == "Flat (exact) on cpu" and set(report["seconds"]) == {"embed_s", "knn_s", "traverse_s"}
    assert random.manifest["similarity"] is None
    train_r, train_s = random.split("train"), similar.split("train")
    assert sorted(train_r.doc_ids) == sorted(train_s.doc_ids), "the same training documents, reordered"
    assert not np.array_equal(train_r.doc_ids, train_s.doc_ids)
    np.testing.assert_array_equal(random.split("val").tokens, similar.split("val").tokens)
    order = np.load(similar.root / "similarity" / "order.npy")
    np.testing.assert_array_equal(np.sort(train_s.doc_ids)[order], train_s.doc_ids)


def test_similarity_order_is_deterministic_and_keyed(ordered, tmp_path):
    _, similar, cache = ordered
    again = prepare_data(_similarity_cfg(tmp_path), progress=False)
    np.testing.assert_array_equal(again.split("train").doc_ids, similar.split("train").doc_ids)
    np.testing.assert_array_equal(again.split("train").tokens, similar.split("train").tokens)
    base = _similarity_cfg(cache)
    assert cache_key(_similarity_cfg(cache, "data.similarity.k=5")) != cache_key(base)
    random = tiny_config(cache, None, "data.max_documents=400").data
    assert cache_key(random) == cache_key(
        tiny_config(cache, None, "data.max_documents=400", "data.similarity.k=5").data
    )


def test_dedup_in_prepare_reports_and_drops(tmp_path):
    rows = [{"text": f"unique document {i} " + "word " * i} for i in range(10)]
    rows += [{"text": "a repeated paragraph of text"}] * 8 + [{"text": ""}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"data.path={path}",
        "data.vocab_size=300",
        f"data.cache_dir={tmp_path / 'c'}",
        "data.val_fraction=0.1",
    ]
    cfg = load_config(None, [*overrides, "data.order=similarity", "data.similarity.dedup_threshold=0.99"]).data
    data = prepare_data(cfg, progress=False)
    dropped = data.manifest["similarity"]["near_duplicates_dropped"]
    repeats_in_train = sum(rows[int(i)]["text"].startswith("a repeated") for i in data.split("train").doc_ids)
    assert dropped >= 6 and repeats_in_train == 1
    assert data.manifest["documents"]["empty_skipped"] == 1
    assert data.manifest["documents"]["used"] == 18 - dropped


def test_missing_embedder_is_a_clear_error_and_leaves_nothing(tmp_path):
    cache = tmp_path / "c"
    cfg = tiny_config(cache, None, "data.order=similarity", f"data.similarity.embedder={tmp_path / 'nope'}").data
    with pytest.raises(DataError, match=r"data.similarity.embedder: .*nope is not a folder; use 'tfidf'"):
        prepare_data(cfg, progress=False)
    assert [p.name for p in (cache / "data").iterdir() if not p.name.endswith(".lock")] == []
    (tmp_path / "model").mkdir()
    cfg = tiny_config(cache, None, "data.order=similarity", f"data.similarity.embedder={tmp_path / 'model'}").data
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs the sentence-transformers package"):
            prepare_data(cfg, progress=False)
