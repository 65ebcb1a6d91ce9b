"""Corpora, tokenizers, packed token streams and the sampler."""

from megamoe.data.packed import Batch, PackedSplit
from megamoe.data.prepare import PreparedData, prepare_data
from megamoe.data.sampler import SequenceSampler

__all__ = ["Batch", "PackedSplit", "PreparedData", "SequenceSampler", "prepare_data"]
