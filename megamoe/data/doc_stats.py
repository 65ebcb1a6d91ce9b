"""How long the documents of a packed split are, and how often a training sequence spans two of them."""

from __future__ import annotations

import numpy as np

SEQ_LENS = (128, 256, 512, 1024, 4096)
"""Sequence lengths the manifest reports the boundary-crossing share for (model.seq_len is not known here)."""


def document_stats(doc_offsets: np.ndarray, tokens: int) -> dict:
    """Documents, mean and median tokens per document (with its end-of-document token), and per sequence
    length L the share of the split's L-token training windows that hold tokens of two or more documents."""
    lengths = np.diff(doc_offsets)
    starts = doc_offsets[1:-1]  # where a document other than the first begins
    crossing = {}
    for seq_len in SEQ_LENS:
        windows = max((tokens - 1) // seq_len, 0)
        if windows == 0:
            continue
        first = np.arange(windows) * seq_len  # window i holds tokens [first, first + L] (inputs and targets)
        inside = np.searchsorted(starts, first + seq_len, side="right") - np.searchsorted(starts, first, side="right")
        crossing[str(seq_len)] = round(float((inside > 0).mean()), 4)
    return {
        "documents": len(lengths),
        "mean_tokens": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
        "median_tokens": float(np.median(lengths)) if len(lengths) else 0.0,
        "sequences_crossing_a_boundary": crossing,
    }
