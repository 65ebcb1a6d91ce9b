"""One prepared source: in this process (data.shard_documents = 0) or in shards on datatrove (> 0)."""

from __future__ import annotations

from megamoe.config import DataConfig
from megamoe.data.prepare import PreparedData, prepare_packed


def prepare_source(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """The prepared data of one source, reused from the cache or built once (sharded: on local workers)."""
    if cfg.shard_documents:
        from megamoe.data.sharded import prepare_sharded  # datatrove is imported only by sharded preparation

        return prepare_sharded(cfg, progress=progress)
    return prepare_packed(cfg, progress)
