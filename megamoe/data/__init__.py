"""Corpora, tokenizers, packed token streams, weighted blends and the samplers."""

from megamoe.data.blend import BlendedSplit, PreparedBlend
from megamoe.data.blend_sampler import BlendSampler
from megamoe.data.entry import prepare_data
from megamoe.data.packed import Batch, PackedSplit
from megamoe.data.prepare import PreparedData
from megamoe.data.sampler import SequenceSampler

__all__ = [
    "Batch",
    "BlendSampler",
    "BlendedSplit",
    "PackedSplit",
    "PreparedBlend",
    "PreparedData",
    "SequenceSampler",
    "prepare_data",
]
