"""Functional ops with autograd, each with a slow obviously-correct reference in `reference.py`."""

from megamoe.ops.grouped import grouped_linear

__all__ = ["grouped_linear"]
