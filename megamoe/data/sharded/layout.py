"""Where a sharded preparation keeps its work, and which documents each shard holds.

The work folder <data.cache_dir>/data/<key>.work holds every stage's output, each written
atomically (a folder renamed into place), so a stage task that finds its output already there has
nothing to do, and a killed task leaves only a temp folder that the next attempt removes:
  plan/                 documents, splits, domains, the tokenizer, the fitted embedder
  tokens/<split>_NNNNN  one token shard: tokens.bin, lengths.npy (+ embeddings.npy: train, similarity)
  knn/index             the faiss index and the train embeddings it was built from
  knn/nbrs_NNNNN        the neighbors of one query shard
  order/                the similarity order of the training documents and its report
  out/<split>/shard_NNNNN  the packed output (renamed to <key> by the last stage)
  logs/<stage>/         datatrove's logs, stats and completion markers, per stage
Shard s of a split holds its documents [s·S, (s+1)·S) (S = data.shard_documents) of a fixed order, so
the output depends on S but never on how many workers or SLURM tasks ran the shards.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamoe.utils.fs import atomic_dir, remove_dead_temps

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Layout:
    """Paths of one sharded preparation."""

    root: Path
    """The finished cache folder, <data.cache_dir>/data/<key>."""

    @property
    def work(self) -> Path:
        """Every stage's output until the last stage finishes."""
        return self.root.with_name(self.root.name + ".work")

    @property
    def plan(self) -> Path:
        """The plan stage's folder."""
        return self.work / "plan"

    def tokens(self, split: str, shard: int) -> Path:
        """One token shard of a split (documents in sorted id order)."""
        return self.work / "tokens" / f"{split}_{shard:05d}"

    @property
    def index(self) -> Path:
        """The faiss index over the training documents' embeddings."""
        return self.work / "knn" / "index"

    def neighbors(self, shard: int) -> Path:
        """The neighbor lists of one query shard."""
        return self.work / "knn" / f"nbrs_{shard:05d}"

    @property
    def order(self) -> Path:
        """The similarity order."""
        return self.work / "order"

    def out(self, split: str, shard: int | None = None) -> Path:
        """The packed output of a split (or one of its shards)."""
        folder = self.work / "out" / split
        return folder if shard is None else folder / f"shard_{shard:05d}"

    def logs(self, stage: str) -> Path:
        """datatrove's logging folder of a stage."""
        return self.work / "logs" / stage


def num_shards(documents: int, size: int) -> int:
    """Shards of `size` documents that hold `documents` (the last may be smaller)."""
    return max(1, math.ceil(documents / size))


def shard_rows(documents: int, size: int, shard: int) -> slice:
    """The rows of one shard."""
    return slice(shard * size, min((shard + 1) * size, documents))


@contextmanager
def stage_output(final: Path) -> Iterator[Path | None]:
    """A temp folder renamed to final on success; None when final exists (this task's work is done)."""
    if final.exists():
        yield None
        return
    remove_dead_temps(final)
    with atomic_dir(final) as tmp:
        yield tmp


def read_json(path: Path) -> dict:
    """A JSON file's content."""
    return json.loads(path.read_text())


def load_rows(folder: Path, name: str) -> np.ndarray:
    """An array a stage saved (name without .npy)."""
    return np.load(folder / f"{name}.npy")


def remove_intermediates(layout: Layout) -> None:
    """Free the disk the stages used; the logs stay (they say what ran, and when)."""
    for name in ("plan", "tokens", "knn", "order"):
        shutil.rmtree(layout.work / name, ignore_errors=True)
