"""Document embeddings for similarity ordering, streamed to a memory-mapped array on disk.

Shape legend: N documents, H hashed features, K embedding dimensions.
The default embedder needs no download: hashed term counts (scikit-learn's HashingVectorizer),
TF-IDF weighted with IDF fitted on a seeded sample, projected by a truncated SVD (fitted on the
same sample) and L2-normalized, so inner products are cosine similarities. A local
sentence-transformers model folder can replace it (data.similarity.embedder). Texts are read in
batches; at no point is the whole corpus in memory.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from megamoe.config import SimilarityConfig
from megamoe.errors import DataError

log = logging.getLogger(__name__)

TextBatches = Callable[[np.ndarray | None], Iterator[list[str]]]
"""texts(rows): batches of document texts, all documents in order (rows=None) or only those rows."""


def _normalize(x_NK: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    norms = np.linalg.norm(x_NK, axis=1, keepdims=True)
    return x_NK / np.maximum(norms, 1e-12)


class TfidfSvdEmbedder:
    """Hashing TF-IDF → truncated SVD → L2 normalization, fitted on a seeded document sample."""

    def __init__(self, cfg: SimilarityConfig, seed: int):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.cfg, self.seed = cfg, seed
        self.hasher = HashingVectorizer(
            n_features=cfg.hash_features, alternate_sign=False, norm=None, token_pattern=r"(?u)\b\w+\b"
        )
        self.tfidf = self.svd = None

    @property
    def dim(self) -> int:
        """Embedding dimensions (may be fewer than configured for a tiny corpus)."""
        return self.svd.n_components

    def fit(self, texts: TextBatches, num_docs: int) -> None:
        """Fit the IDF weights and the SVD on up to fit_documents documents."""
        from scipy import sparse
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfTransformer

        rng = np.random.default_rng([self.seed, 3])
        take = min(num_docs, self.cfg.fit_documents)
        rows = np.sort(rng.choice(num_docs, take, replace=False))
        counts_NH = sparse.vstack([self.hasher.transform(batch) for batch in texts(rows)]).tocsr()
        self.tfidf = TfidfTransformer(sublinear_tf=True).fit(counts_NH)
        weighted_NH = self.tfidf.transform(counts_NH)
        dim = max(1, min(self.cfg.dim, weighted_NH.shape[0] - 1, weighted_NH.shape[1] - 1))
        svd = TruncatedSVD(dim, algorithm="randomized", n_iter=5, random_state=self.seed)
        with warnings.catch_warnings():  # a rank-deficient sample (e.g. all duplicates) makes the unused
            warnings.simplefilter("ignore", RuntimeWarning)  # explained_variance_ratio_ divide by zero
            self.svd = svd.fit(weighted_NH)

    def __call__(self, batch: list[str]) -> np.ndarray:
        """Unit-norm embeddings of one batch of texts."""
        return _normalize(self.svd.transform(self.tfidf.transform(self.hasher.transform(batch))))


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (mean-pooled, normalized); nothing is downloaded."""

    def __init__(self, path: str):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"data.similarity.embedder: {path} is not a folder; use 'tfidf' or a local sentence-transformers model"
            )
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise DataError(
                "data.similarity.embedder: a model folder needs the sentence-transformers package "
                "(pip install sentence-transformers), or use 'tfidf'"
            ) from None
        self.model = SentenceTransformer(str(folder), local_files_only=True)
        self.dim = self.model.get_sentence_embedding_dimension()

    def fit(self, texts: TextBatches, num_docs: int) -> None:
        """Pretrained: nothing to fit."""

    def __call__(self, batch: list[str]) -> np.ndarray:
        """Unit-norm embeddings of one batch of texts."""
        return self.model.encode(batch, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def make_embedder(cfg: SimilarityConfig, seed: int):
    """The configured embedder."""
    if cfg.embedder == "tfidf":
        return TfidfSvdEmbedder(cfg, seed)
    return SentenceTransformerEmbedder(cfg.embedder)


def embed_documents(
    cfg: SimilarityConfig, texts: TextBatches, num_docs: int, out: Path, seed: int, progress: bool
) -> np.ndarray:
    """Embed every document into a float16 .npy memmap at `out` (N × K, unit rows); returns the memmap."""
    embedder = make_embedder(cfg, seed)
    embedder.fit(texts, num_docs)
    emb_NK = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(num_docs, embedder.dim))
    bar = tqdm(total=num_docs, desc="embed", unit="doc", disable=not progress)
    start = 0
    for batch in texts(None):
        emb_NK[start : start + len(batch)] = embedder(batch)
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    if start != num_docs:
        raise DataError(f"data: expected {num_docs} documents to embed, read {start}")
    emb_NK.flush()
    return emb_NK
