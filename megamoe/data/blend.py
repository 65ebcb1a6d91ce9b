"""Weighted blends (data.blend): every source prepared into its own cache, read together as one dataset.

Shape legend: K sources, N sequences, B batch, L sequence.
Each source is prepared exactly as a single-source run with data.path = its path (and its own
order/format/fields when the entry sets them) would prepare it, into that run's cache, except
that all sources share one tokenizer: data.tokenizer when set, else the BPE trained on the first
source's training documents, with which every later source is then tokenized. A split of the
blend numbers its sequences source after source (blend id = offset_k + the source's own id) and
its domains likewise, named '<source>/<domain>'.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamoe.config import DataConfig
from megamoe.config.data_schema import BlendSource
from megamoe.data.corpus import resolve_files
from megamoe.data.packed import Batch, PackedSplit
from megamoe.data.prepare import PreparedData
from megamoe.data.source import prepare_source
from megamoe.errors import DataError

SOURCE_KEYS = ("path", "format", "text_field", "domain_field", "order")
"""data.* keys a blend entry sets for its own source: errors about them name the entry's key."""


@dataclass
class BlendPart:
    """One prepared source of a blend."""

    name: str
    weight: float
    """Normalized: the parts' weights sum to 1."""
    data: PreparedData


class BlendedSplit:
    """One split ('train' or 'val') of every source, as one dataset of blend ids."""

    def __init__(self, parts: list[PackedSplit], domain_offsets_K: list[int]):
        self.parts, self.domain_offsets_K = parts, domain_offsets_K

    def offsets(self, seq_len: int) -> np.ndarray:
        """(K,) the blend id of each source's sequence 0."""
        sizes = [part.num_sequences(seq_len) for part in self.parts]
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def num_sequences(self, seq_len: int) -> int:
        """Whole L-token windows over all sources."""
        return sum(part.num_sequences(seq_len) for part in self.parts)

    def batch(self, ids: np.ndarray, seq_len: int) -> Batch:
        """The sequences with the given blend ids as one batch, domains renumbered to the blend's."""
        import torch  # as in PackedSplit.batch: `megamoe data prepare` never needs torch

        offsets_K = self.offsets(seq_len)
        source_N = np.searchsorted(offsets_K, ids, side="right") - 1
        tokens_BL = torch.empty(len(ids), seq_len + 1, dtype=torch.int64)
        domains_BL = torch.empty(len(ids), seq_len, dtype=torch.int64)
        for k in np.unique(source_N):
            rows = torch.from_numpy(np.flatnonzero(source_N == k))
            part = self.parts[k].batch(ids[rows.numpy()] - offsets_K[k], seq_len)
            tokens_BL[rows, :-1], tokens_BL[rows, -1] = part.tokens_BL, part.targets_BL[:, -1]
            domains_BL[rows] = part.domains_BL + self.domain_offsets_K[k]
        return Batch(tokens_BL[:, :-1], tokens_BL[:, 1:], domains_BL)


@dataclass
class PreparedBlend:
    """Every prepared source of data.blend, with PreparedData's interface over the whole blend."""

    parts: list[BlendPart]

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer every source was packed with."""
        return self.parts[0].data.tokenizer_path

    @property
    def vocab_size(self) -> int:
        """Token ids are < vocab_size."""
        return self.parts[0].data.vocab_size

    @property
    def domains(self) -> list[str]:
        """'<source>/<domain>' for every source's domains, source after source."""
        return [f"{part.name}/{d}" for part in self.parts for d in part.data.domains]

    def domain_offsets(self) -> list[int]:
        """(K,) the blend domain id of each source's domain 0."""
        sizes = [len(part.data.domains) for part in self.parts]
        return [sum(sizes[:k]) for k in range(len(sizes))]

    def domain_ranges(self) -> list[tuple[int, int]]:
        """(K,) each source's blend domain ids: range(lo, hi)."""
        offsets = self.domain_offsets()
        return list(zip(offsets, [*offsets[1:], len(self.domains)]))

    def split(self, name: str) -> BlendedSplit:
        """The 'train' or 'val' split of every source, as one."""
        return BlendedSplit([part.data.split(name) for part in self.parts], self.domain_offsets())

    @functools.cached_property
    def manifest(self) -> dict:
        """The blend: its key, sources (weights, documents, tokens), tokenizer, domains, unigram baseline."""
        sources = [_source_summary(part) for part in self.parts]
        ident = [(s["name"], s["weight"], s["key"]) for s in sources]
        log_ppl = sum(part.weight * math.log(part.data.manifest["unigram_val_ppl"]) for part in self.parts)
        return {
            "key": hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16],
            "blend": sources,
            "tokenizer": self.parts[0].data.manifest["tokenizer"],
            "domains": self.domains,
            "unigram_val_ppl": math.exp(log_ppl),
        }


def _source_summary(part: BlendPart) -> dict:
    """One source's line of the blend manifest."""
    manifest = part.data.manifest
    return {
        "name": part.name,
        "weight": part.weight,
        "source": manifest["source"],
        "order": manifest["settings"]["order"],
        "key": manifest["key"],
        "root": str(part.data.root),
        "documents": manifest["documents"]["used"],
        "train_tokens": manifest["splits"]["train"]["tokens"],
        "val_tokens": manifest["splits"]["val"]["tokens"],
    }


def source_config(cfg: DataConfig, source: BlendSource) -> DataConfig:
    """The single-source DataConfig that prepares one blend source."""
    return dataclasses.replace(
        cfg,
        blend=None,
        path=source.path,
        order=source.order or cfg.order,
        format=source.format or cfg.format,
        text_field=source.text_field or cfg.text_field,
        domain_field=source.domain_field or cfg.domain_field,
    )


@contextmanager
def _as_source(k: int, name: str) -> Iterator[None]:
    """Name the blend entry in a data error of its source ('data.path: ...' → 'data.blend[k].path (name): ...')."""
    try:
        yield
    except DataError as err:
        head, _, rest = str(err).partition(": ")
        if head.startswith("data.") and head.removeprefix("data.") in SOURCE_KEYS:
            raise DataError(f"data.blend[{k}].{head.removeprefix('data.')} ({name}): {rest}") from None
        raise DataError(f"data.blend[{k}] ({name}): {err}") from None


def prepare_blend(cfg: DataConfig, progress: bool = True) -> PreparedBlend:
    """Prepare (or reuse) every source of cfg.blend with one shared tokenizer."""
    assert cfg.blend, "prepare_blend needs data.blend"
    total = math.fsum(source.weight for source in cfg.blend)
    configs = [source_config(cfg, source) for source in cfg.blend]
    for k, (source, one) in enumerate(zip(cfg.blend, configs)):
        with _as_source(k, source.label):  # every source's files exist before any is prepared
            if one.path:
                resolve_files(one)
    parts: list[BlendPart] = []
    for k, (source, one) in enumerate(zip(cfg.blend, configs)):
        if k > 0 and not cfg.tokenizer:  # the first source's trained BPE tokenizes every other source
            one = dataclasses.replace(one, tokenizer=str(parts[0].data.tokenizer_path))
        with _as_source(k, source.label):
            parts.append(BlendPart(source.label, source.weight / total, prepare_source(one, progress)))
    check_one_tokenizer(parts)
    return PreparedBlend(parts)


def check_one_tokenizer(parts: list[BlendPart]) -> None:
    """Every source was packed with the first source's tokenizer (else one error naming the source)."""
    first = parts[0]
    reference = json.loads(first.data.tokenizer_path.read_text())
    for k, part in enumerate(parts[1:], 1):
        same = json.loads(part.data.tokenizer_path.read_text()) == reference
        if not same or part.data.vocab_size != first.data.vocab_size:
            raise DataError(
                f"data.blend[{k}] ({part.name}): packed with another tokenizer ({part.data.vocab_size} tokens, "
                f"{part.data.tokenizer_path}) than data.blend[0] ({first.name}: {first.data.vocab_size} tokens, "
                f"{first.data.tokenizer_path}); all sources of a blend must share one tokenizer"
            )
