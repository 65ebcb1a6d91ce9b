"""Megatron's blended datasets as a pure function of stream position (data.blend).

Shape legend: K sources, N stream positions.
Position p of the training stream reads source argmax_k (w_k·(p+1) − c_k(p)), where c_k(p) counts
the positions before p that read source k and ties go to the lower k: Megatron's
build_blending_indices rule (it uses max(p, 1) for p + 1). With normalized weights w and the excess
e_k(n) = c_k(n) − w_k·n after n positions,

    −(K−1)²/K ≤ e_k(n) ≤ 1 − 1/K        (two sources: |e_k(n)| ≤ 1/2).

Upper bound: Σ_k (w_k − e_k(n)) = 1, so the chosen source has w_k − e_k(n) ≥ 1/K and its excess
becomes e_k(n) + 1 − w_k ≤ 1 − 1/K, while every other excess falls. Lower bound: Σ_k e_k(n) = 0.
So a source is never more than one sample ahead of its share; with three or more sources one can
fall a little more than one sample behind (1.17 seen with five sources), never more than (K−1)²/K.

Source k's j-th sample is position j of source k's own SequenceSampler stream (seeded epochs of
its own sequences): every source keeps its own order, and a source smaller than its share wraps
into its next epoch. A blend id is offset_k + local id, offset_k = the sequences of sources < k.

Memory: the index is computed lazily, CHUNK positions at a time. Only the counts at chunk
boundaries (K integers per CHUNK positions) and the last chunk's sources are kept. The first
lookup at position p walks the rule from 0 (O(p·K) Python steps, about 0.3 µs each: ~10 s for
30M samples when a long run resumes); later lookups cost one chunk.
"""

from __future__ import annotations

import math

import numpy as np

from megamoe.data.sampler import SequenceSampler, StreamSampler

CHUNK = 1 << 16
"""Stream positions per lazily computed chunk of the blend index."""


class BlendIndex:
    """Which source each stream position reads, and how many earlier positions read each source."""

    def __init__(self, weights: list[float]):
        total = math.fsum(weights)
        self.weights_K = [w / total for w in weights]
        self._bounds_K = [np.zeros(len(weights), dtype=np.int64)]
        """Counts per source at each computed chunk boundary m·CHUNK."""
        self._cached, self._sources_N = -1, np.empty(0, dtype=np.int64)

    @property
    def num_sources(self) -> int:
        """K."""
        return len(self.weights_K)

    def _compute(self, m: int) -> np.ndarray:
        """The sources of chunk m's positions: the greedy deficit rule from the counts at its start."""
        weights, counts = self.weights_K, self._bounds_K[m].tolist()
        sources, start = range(len(weights)), m * CHUNK
        out = [0] * CHUNK
        for j in range(CHUNK):
            n1 = start + j + 1
            best, pick = -math.inf, 0
            for k in sources:
                deficit = n1 * weights[k] - counts[k]
                if deficit > best:
                    best, pick = deficit, k
            counts[pick] += 1
            out[j] = pick
        return np.asarray(out, dtype=np.int64)

    def _chunk(self, m: int) -> np.ndarray:
        """Chunk m's sources (the last chunk asked for stays cached)."""
        if m != self._cached:
            self._extend(m)
            self._cached, self._sources_N = m, self._compute(m)
        return self._sources_N

    def _extend(self, m: int) -> None:
        """Know the counts at every chunk boundary up to chunk m's start."""
        while len(self._bounds_K) <= m:
            last = len(self._bounds_K) - 1
            self._cached, self._sources_N = last, self._compute(last)
            self._bounds_K.append(self._bounds_K[last] + np.bincount(self._sources_N, minlength=self.num_sources))

    def counts(self, n: int) -> np.ndarray:
        """(K,) how many of positions 0 .. n-1 read each source."""
        m, off = divmod(n, CHUNK)
        self._extend(m)
        if off == 0:
            return self._bounds_K[m].copy()
        return self._bounds_K[m] + np.bincount(self._chunk(m)[:off], minlength=self.num_sources)

    def lookup(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source_N, index_N) of positions start .. start+count-1: the source read, and which of its samples."""
        source_N, index_N = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            m, off = divmod(start + done, CHUNK)
            take = min(CHUNK - off, count - done)
            base_K = self.counts(start + done)
            src_N = self._chunk(m)[off : off + take]
            for k in range(self.num_sources):
                rows = np.flatnonzero(src_N == k)
                index_N[done + rows] = base_K[k] + np.arange(len(rows))
            source_N[done : done + take] = src_N
            done += take
        return source_N, index_N


class BlendSampler(StreamSampler):
    """Blend ids of a weighted blend: each position's source by BlendIndex, its sequence by that source's stream."""

    def __init__(self, num_sequences_K: list[int], weights_K: list[float], seed: int):
        self.index = BlendIndex(weights_K)
        self.streams = [SequenceSampler(n, seed, stream=k + 1) for k, n in enumerate(num_sequences_K)]
        self.offsets_K = np.concatenate([[0], np.cumsum(num_sequences_K)[:-1]]).astype(np.int64)

    def positions(self, start: int, count: int) -> np.ndarray:
        """Blend ids at stream positions start .. start+count-1."""
        source_N, index_N = self.index.lookup(start, count)
        out = np.empty(count, dtype=np.int64)
        for k, stream in enumerate(self.streams):
            rows = np.flatnonzero(source_N == k)
            if len(rows):  # a source's samples within a range of positions are consecutive in its stream
                out[rows] = self.offsets_K[k] + stream.positions(int(index_N[rows[0]]), len(rows))
        return out

    def shares(self, n: int) -> np.ndarray:
        """(K,) the fraction of positions 0 .. n-1 that read each source (exact, from the index)."""
        return self.index.counts(n) / max(n, 1)
