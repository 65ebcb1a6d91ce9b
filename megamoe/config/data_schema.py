"""The data sections of the config tree: where documents come from, and the similarity ordering."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megamoe.config.checks import _check, _nested, _non_negative, _positive

SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""What a blend source's name may hold: it becomes part of metric keys (eval/<name>/loss)."""


@dataclass(kw_only=True)
class SimilarityConfig:
    """In-Context Pretraining ordering (Lory §3.2): embed documents, kNN with faiss, greedy path."""

    embedder: str = "tfidf"
    """tfidf = hashing TF-IDF + truncated SVD (no download); else a local sentence-transformers model folder."""
    dim: int = 64
    """tfidf embedder: SVD dimensions."""
    hash_features: int = 2**18
    """tfidf embedder: hashed vocabulary size."""
    fit_documents: int = 50_000
    """tfidf embedder: documents (a seeded sample) that fit the IDF weights and the SVD."""
    batch_size: int = 4096
    """Documents embedded (and queries searched) per batch."""
    k: int = 10
    """Nearest neighbors per document (excluding itself); capped at documents − 1."""
    index: Literal["auto", "flat", "ivf", "ivfpq", "fastscan"] = "auto"
    """faiss index: flat (exact), ivf, ivfpq or fastscan; auto = flat, ivf, then fastscan by corpus size (see below)."""
    exact_max_documents: int = 100_000
    """index: auto uses the exact index up to this many documents, ivf above."""
    fast_min_documents: int = 2_000_000
    """index: auto uses fastscan (IVF-HNSW, 4-bit fast-scan PQ, float16 re-rank; CPU) from this many documents."""
    fast_nprobe: int = 8
    """fastscan: IVF lists searched per query."""
    fast_candidates: int = 20
    """fastscan: candidates per neighbor (fast_candidates·k) from the 4-bit codes, re-ranked by float16 copies."""
    nlist: int = 0
    """IVF lists; 0 = 4·√N (fastscan: at most 8192), at most N/39 (faiss wants ≥ 39 training points per list)."""
    nprobe: int = 16
    """ivf, ivfpq: IVF lists searched per query (fastscan: fast_nprobe)."""
    pq_m: int = 16
    """IVF-PQ: sub-quantizers (must divide the embedding dimension), 8 bits each."""
    dedup_threshold: float = 0.0
    """Drop a document whose cosine similarity to an earlier kept neighbor is ≥ this; 0 = keep all."""

    def validate(self) -> None:
        """Check ranges."""
        _positive(self, "dim", "hash_features", "fit_documents", "batch_size", "k", "exact_max_documents")
        _positive(self, "nprobe", "pq_m", "fast_min_documents", "fast_nprobe", "fast_candidates")
        _non_negative(self, "nlist")
        _check(bool(self.embedder), "embedder", "must be 'tfidf' or a local sentence-transformers model folder")
        _check(0.0 <= self.dedup_threshold <= 1.0, "dedup_threshold", f"must be in [0, 1], got {self.dedup_threshold}")


@dataclass(kw_only=True)
class BlendSource:
    """One source of a weighted blend (data.blend): a data.path and the share of samples drawn from it."""

    path: str
    """The source, as data.path names one: a file, glob or saved dataset dir ('' = the embedded corpus)."""
    weight: float
    """Sampling weight, > 0; the blend's weights are normalized to sum to 1."""
    name: str = ""
    """Name in metrics (eval/<name>/loss, data/share/<name>); '' = the path's file stem."""
    order: Literal["", "random", "similarity"] = ""
    """This source's document order; '' = data.order."""
    format: Literal["", "auto", "jsonl", "json", "parquet", "text", "arrow"] = ""
    """This source's file format; '' = data.format."""
    text_field: str = ""
    """This source's text column; '' = data.text_field."""
    domain_field: str = ""
    """This source's domain column; '' = data.domain_field."""

    @property
    def label(self) -> str:
        """name, else the path's stem (a glob's folder; 'embedded' for the embedded corpus)."""
        if self.name:
            return self.name
        if not self.path:
            return "embedded"
        path = Path(self.path)
        return path.parent.name if any(c in path.stem for c in "*?[") else path.stem

    def validate(self) -> None:
        """A usable weight and name."""
        _check(math.isfinite(self.weight) and self.weight > 0, "weight", f"must be a number > 0, got {self.weight}")
        _check(
            SOURCE_NAME.fullmatch(self.label) is not None,
            "name",
            f"{self.label!r} cannot name metrics: use letters, digits, '_', '.', '-' (set name: for this source)",
        )


@dataclass(kw_only=True)
class DataConfig:
    """Where documents come from and how they become packed token sequences."""

    path: str = ""
    """Corpus: '' = the embedded corpus (Python stdlib sources); else a file, glob or saved dataset dir."""
    embedded_unit: Literal["module", "definition"] = "module"
    """Embedded corpus documents: whole modules, or each top-level function/class (+ the module's rest)."""
    format: Literal["auto", "jsonl", "json", "parquet", "text", "arrow"] = "auto"
    """File format of data.path; auto = from the file extension (a directory = a saved dataset)."""
    text_field: str = "text"
    """Column holding each document's text (jsonl/json/parquet/arrow)."""
    domain_field: str = ""
    """Column holding each document's domain tag; '' = the file name's stem."""
    tokenizer: str = ""
    """'' = train a byte-level BPE on the training documents; else the path of a tokenizer.json."""
    vocab_size: int = 4096
    """Vocabulary size of the trained BPE (unused with data.tokenizer)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (split by document)."""
    order: Literal["random", "similarity"] = "random"
    """Training documents' order before packing: a seeded shuffle, or a greedy path through their kNN graph."""
    seed: int = 1234
    """Seed of the document split, order and subsampling."""
    max_documents: int = 0
    """Use at most this many documents (a seeded sample); 0 = all."""
    exclude_domains: list[str] = field(default_factory=list)
    """Domains to leave out (e.g. ['test'] for the embedded corpus)."""
    cache_dir: str = ".cache/megamoe"
    """Folder for tokenizers and packed token files, keyed by a hash of inputs and settings."""
    similarity: SimilarityConfig = field(default_factory=lambda: SimilarityConfig())
    """Similarity ordering (data.order: similarity): embedder, kNN index, traversal, dedup."""
    shard_documents: int = 0
    """0 = prepare in one process; else in shards of this many documents (datatrove; --workers, --slurm)."""
    blend: list[BlendSource] | None = None
    """Weighted blend instead of data.path: [{path, weight, name?, order?, format?, text_field?, domain_field?}]."""

    def validate(self) -> None:
        """Check ranges."""
        _nested(self.similarity, "similarity")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(self.vocab_size >= 260, "vocab_size", f"must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        _non_negative(self, "max_documents", "shard_documents")
        _check(bool(self.text_field), "text_field", "must not be empty")
        _check(bool(self.cache_dir), "cache_dir", "must not be empty")
        _check(
            self.embedded_unit == "module" or not self.path,
            "embedded_unit",
            f"cuts the embedded corpus; data.path is set ({self.path!r})",
        )
        if self.blend is not None:
            self._validate_blend(self.blend)

    def _validate_blend(self, blend: list[BlendSource]) -> None:
        """At least one source, no data.path beside it, every source valid and uniquely named."""
        _check(bool(blend), "blend", "is empty: list at least one {path, weight} source, or set it to null")
        _check(not self.path, "blend", f"replaces data.path ({self.path!r}); make that file a blend source instead")
        seen: dict[str, int] = {}
        for i, source in enumerate(blend):
            _nested(source, f"blend[{i}]")
            name = source.label
            _check(
                name not in seen,
                f"blend[{i}].name",
                f"{name!r} already names data.blend[{seen.get(name)}]; every source needs its own name (set name:)",
            )
            seen[name] = i
