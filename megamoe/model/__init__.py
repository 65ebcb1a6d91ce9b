"""The transformer and its blocks: pure torch, no torch.distributed."""

from megamoe.model.factory import LayerFactory
from megamoe.model.transformer import ModelOutput, Transformer, build_model

__all__ = ["LayerFactory", "ModelOutput", "Transformer", "build_model"]
