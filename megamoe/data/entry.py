"""`prepare_data`: the data a config trains on — one source, or every source of data.blend."""

from __future__ import annotations

from megamoe.config import DataConfig
from megamoe.data.blend import PreparedBlend, prepare_blend
from megamoe.data.prepare import PreparedData
from megamoe.data.source import prepare_source


def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData | PreparedBlend:
    """The prepared data for cfg (every source of data.blend): reused from the cache, or built once and cached."""
    if cfg.blend:
        return prepare_blend(cfg, progress)
    return prepare_source(cfg, progress)
