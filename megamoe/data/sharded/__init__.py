"""Sharded data preparation (data.shard_documents > 0) on datatrove: local workers or SLURM array jobs.

The output is one cache folder, <data.cache_dir>/data/<key>, whose splits are folders of packed
shards (megamoe/data/packed.py reads them as one stream). It is byte-for-byte the same whatever the
number of workers or tasks, and its tokens are those of the one-process preparation of the same
data (docs/data.md). Every stage task writes its output atomically and skips work already done,
so a killed worker, task or job reruns only its unfinished shards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megamoe.config import DataConfig
from megamoe.data.prepare import PreparedData, cache_key, cache_lock
from megamoe.data.sharded.layout import Layout, remove_intermediates
from megamoe.data.sharded.pipeline import SlurmOptions, live_jobs, run_local, submit_slurm
from megamoe.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["SlurmOptions", "prepare_sharded", "sharded_layout", "submit_sharded"]


def sharded_layout(cfg: DataConfig) -> tuple[str, Layout]:
    """The cache key of cfg and the paths of its sharded preparation."""
    key = cache_key(cfg)
    return key, Layout(Path(cfg.cache_dir).expanduser() / "data" / key)


def _not_submitted(layout: Layout) -> None:
    """An error while SLURM jobs of this preparation are still pending or running."""
    jobs = live_jobs(layout)
    if jobs:
        raise DataError(
            f"data: {layout.root} is being prepared by SLURM jobs {' '.join(jobs)} (pending or running); "
            "wait for them to end, or scancel them, then rerun"
        )


def _finished(layout: Layout) -> PreparedData | None:
    """The finished cache (leftover intermediates removed), or None."""
    manifest = layout.root / "manifest.json"
    if not manifest.is_file():
        if layout.root.exists():
            raise DataError(
                f"data.cache_dir: {layout.root} is incomplete (no manifest.json); delete that folder and rerun"
            )
        return None
    if (layout.work / "plan").exists():
        remove_intermediates(layout)
    return PreparedData(layout.root, json.loads(manifest.read_text()))


def prepare_sharded(cfg: DataConfig, workers: int = 1, progress: bool = True) -> PreparedData:
    """The sharded cache of cfg: reused, or prepared now by `workers` local processes."""
    key, layout = sharded_layout(cfg)
    with cache_lock(layout.root.with_suffix(".lock")):
        done = _finished(layout)
        if done is None:
            _not_submitted(layout)
            size = cfg.shard_documents
            log.info("data: preparing %s in shards of %d documents, %d worker(s)", layout.root, size, workers)
            run_local(cfg, layout, key, workers)
            done = _finished(layout)
    return done


def submit_sharded(cfg: DataConfig, opts: SlurmOptions) -> tuple[Layout, list[str]]:
    """Submit cfg's sharded preparation as SLURM jobs (none when it is finished); (layout, job ids)."""
    key, layout = sharded_layout(cfg)
    with cache_lock(layout.root.with_suffix(".lock")):
        if _finished(layout) is not None:
            return layout, []
        _not_submitted(layout)
        return layout, submit_slurm(cfg, layout, key, opts)
