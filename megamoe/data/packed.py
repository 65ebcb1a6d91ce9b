"""Packed token streams: documents concatenated with an end-of-document token, memory-mapped.

One split is a folder with
  tokens.bin       every token of every document, each followed by EOD (uint16 or uint32)
  domains.bin      the domain id of every token (uint16)
  doc_offsets.npy  int64, (documents + 1): document i is tokens[offsets[i]:offsets[i+1]], EOD last
  doc_ids.npy      int64, (documents,): each document's index in the source corpus
Sequence i of length L is the window tokens[i·L : i·L + L + 1] (inputs and shifted targets).

A sharded split (data.shard_documents) is a folder of such folders, listed in order by shards.json;
it reads as their concatenation (windows may span two shards), and nothing is concatenated on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class SplitWriter:
    """Streams documents of one split to disk."""

    def __init__(self, folder: Path, dtype: np.dtype):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.dtype = folder, dtype
        self._tokens = open(folder / "tokens.bin", "wb")  # noqa: SIM115 - closed by close()
        self._domains = open(folder / "domains.bin", "wb")  # noqa: SIM115
        self._offsets, self._doc_ids = [0], []

    def add(self, ids: list[int], eod: int, domain_id: int, doc_id: int) -> None:
        """Append one document followed by EOD."""
        arr = np.asarray([*ids, eod], dtype=self.dtype)
        self._tokens.write(arr.tobytes())
        self._domains.write(np.full(len(arr), domain_id, dtype=np.uint16).tobytes())
        self._offsets.append(self._offsets[-1] + len(arr))
        self._doc_ids.append(doc_id)

    def add_packed(self, tokens: np.ndarray, domain_id: int, doc_id: int) -> None:
        """Append one document's tokens that already end with EOD."""
        self._tokens.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._domains.write(np.full(len(tokens), domain_id, dtype=np.uint16).tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))
        self._doc_ids.append(doc_id)

    def close(self) -> dict[str, int]:
        """Flush everything; returns the split's document and token counts."""
        self._tokens.close()
        self._domains.close()
        np.save(self.folder / "doc_offsets.npy", np.asarray(self._offsets, dtype=np.int64))
        np.save(self.folder / "doc_ids.npy", np.asarray(self._doc_ids, dtype=np.int64))
        return {"documents": len(self._doc_ids), "tokens": self._offsets[-1]}


@dataclass
class Batch:
    """One micro-batch of packed sequences."""

    tokens_BL: torch.Tensor
    targets_BL: torch.Tensor
    domains_BL: torch.Tensor
    """Domain id of each target token."""


SHARDS_FILE = "shards.json"
"""A sharded split's list of shard folders, in stream order."""


class ConcatArray:
    """Several 1-D arrays read as one: len() and contiguous slices (which may span parts)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0, *map(len, parts)])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        """Elements [start, stop) of the concatenation (step 1)."""
        start, stop, step = window.indices(len(self))
        if step != 1:
            raise IndexError("ConcatArray supports contiguous slices only")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            part, offset = self.parts[first], int(self.starts[first])
            take = min(stop, offset + len(part)) - start
            pieces.append(np.asarray(part[start - offset : start - offset + take]))
            start, first = start + take, first + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[0 : len(self)]
        return out if dtype is None else out.astype(dtype)


def _shard_folders(folder: Path) -> list[Path] | None:
    """A sharded split's shard folders in order, or None for a plain split."""
    listing = folder / SHARDS_FILE
    if not listing.is_file():
        return None
    return [folder / name for name in json.loads(listing.read_text())["shards"]]


class PackedSplit:
    """Read-only, memory-mapped view of one split (plain, or the concatenation of its shards)."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder = folder
        shards = _shard_folders(folder)
        if shards is None:
            self.tokens = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r")
            self.domains = np.memmap(folder / "domains.bin", dtype=np.uint16, mode="r")
            self.doc_offsets = np.load(folder / "doc_offsets.npy")
            self.doc_ids = np.load(folder / "doc_ids.npy")
            return
        parts = [PackedSplit(shard, dtype) for shard in shards]
        self.tokens = ConcatArray([p.tokens for p in parts])
        self.domains = ConcatArray([p.domains for p in parts])
        starts = self.tokens.starts
        offsets = [p.doc_offsets[1:] + start for p, start in zip(parts, starts)]
        self.doc_offsets = np.concatenate([np.zeros(1, np.int64), *offsets])
        self.doc_ids = np.concatenate([p.doc_ids for p in parts])

    def num_sequences(self, seq_len: int) -> int:
        """Whole L-token training windows in this split."""
        return max((len(self.tokens) - 1) // seq_len, 0)

    def document(self, i: int) -> np.ndarray:
        """Tokens of the i-th document of this split, without its EOD."""
        return np.asarray(self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1] - 1])

    def batch(self, indices: np.ndarray, seq_len: int) -> Batch:
        """The sequences with the given indices as one batch."""
        import torch  # here, not at the top: `megamoe data prepare` never needs torch (1-2 s to import)

        windows = [slice(i * seq_len, i * seq_len + seq_len + 1) for i in indices]
        toks = torch.from_numpy(np.stack([self.tokens[w] for w in windows]).astype(np.int64))
        doms = torch.from_numpy(np.stack([self.domains[w] for w in windows]).astype(np.int64))
        return Batch(toks[:, :-1], toks[:, 1:], doms[:, 1:])
