"""Sparse mixture-of-experts blocks: routing, experts, dispatch, losses, statistics."""

from megamoe.model.moe.block import MoEFFN, MoELayerOutput
from megamoe.model.moe.dispatch import LocalDispatcher
from megamoe.model.moe.experts import GroupedExperts
from megamoe.model.moe.stats import RoutingStats
from megamoe.model.moe.tokens import TokenGroup

__all__ = ["GroupedExperts", "LocalDispatcher", "MoEFFN", "MoELayerOutput", "RoutingStats", "TokenGroup"]
