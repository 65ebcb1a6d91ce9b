"""A seeded, resumable, data-parallel-aware sequence sampler.

The sampler is a pure function of position: the training stream is epoch after epoch of seeded
permutations of the sequence indices, and optimizer step s consumes positions
[s·G, (s+1)·G) of it (G = global batch). Data-parallel rank r takes the r-th contiguous share of
that global batch and cuts it into micro-batches. Resuming at step s needs nothing but s, and the
global batch of a step is the same whatever the data-parallel degree.
"""

from __future__ import annotations

import numpy as np


class StreamSampler:
    """A pure function from stream position to sequence id, cut into steps, ranks and micro-batches."""

    def positions(self, start: int, count: int) -> np.ndarray:
        """Sequence ids at stream positions start .. start+count-1."""
        raise NotImplementedError

    def micro_batches(self, step: int, global_batch: int, dp_rank: int, dp_size: int, micro: int) -> list[np.ndarray]:
        """This rank's micro-batches of optimizer step `step`."""
        share = global_batch // dp_size
        ids = self.positions(step * global_batch + dp_rank * share, share)
        return [ids[i : i + micro] for i in range(0, share, micro)]


class SequenceSampler(StreamSampler):
    """Which sequence indices each (step, data-parallel rank, micro-batch) reads."""

    def __init__(self, num_sequences: int, seed: int, stream: int = 0):
        """stream: 0 for a single source; a blend gives source k stream k + 1 (its own permutations)."""
        if num_sequences <= 0:
            raise ValueError("the training split holds no complete sequence")
        self.num_sequences, self.seed, self.stream = num_sequences, seed, stream
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        """The sequence order of one epoch (cached: steps read epochs in order)."""
        if epoch != self._epoch:
            # [seed, epoch, 0] seeds exactly as [seed, epoch] (numpy drops trailing zeros): stream 0 is unchanged
            entropy = [self.seed, epoch, self.stream]
            self._perm = np.random.default_rng(entropy).permutation(self.num_sequences)
            self._epoch = epoch
        return self._perm

    def positions(self, start: int, count: int) -> np.ndarray:
        """Sequence indices at stream positions start .. start+count-1."""
        out = np.empty(count, dtype=np.int64)
        for j, pos in enumerate(range(start, start + count)):
            epoch, offset = divmod(pos, self.num_sequences)
            out[j] = self._permutation(epoch)[offset]
        return out
