"""Run directories: choose one, prepare the data, resolve and save the config."""

from __future__ import annotations

import datetime
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from megamoe.config import Config, load_config, save_config
from megamoe.config.resolve import with_vocab
from megamoe.data import PreparedData, prepare_data
from megamoe.errors import CheckpointError, MegamoeError
from megamoe.train.checkpoint import (
    checkpoint_step,
    checkpoints_root,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    resume_candidates,
    set_aside,
)
from megamoe.train.dist import barrier, from_main, is_main, on_main
from megamoe.utils.fs import remove_stale_temps
from megamoe.utils.locks import hold_for_life

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".megamoe.lock"
"""Held by the process that trains in a run dir (its rank 0), for as long as it lives."""


@dataclass
class RunSetup:
    """Everything a trainer needs that is decided before it starts."""

    cfg: Config
    run_dir: Path
    data: PreparedData
    resume_from: list[Path]
    """Checkpoints to try, newest first (empty: a fresh start)."""
    resume_explicit: bool = False
    """The user named the checkpoint (--resume-from): a corrupt one is an error, not skipped."""


def is_run_dir(path: str | Path) -> bool:
    """path is a run directory (it holds the resolved config)."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_run_config(config: str | None, overrides: list[str]) -> Config:
    """Config from a YAML file, or from a run directory's saved config (to resume it)."""
    if config is not None and is_run_dir(config):
        cfg = load_config(Path(config) / CONFIG_FILE, [*overrides, f"train.run_dir={config}"])
        return cfg
    return load_config(config, overrides)


def choose_run_dir(cfg: Config) -> Path:
    """train.run_dir, or runs/<name>-<date>-<time>."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.train.name or 'default'}-{stamp}"


def _prepare_once(cfg: Config, progress: bool) -> PreparedData:
    """Rank 0 prepares the data (its error stops every rank); the other ranks then reuse its cache."""
    data = on_main(lambda: prepare_data(cfg.data, progress=progress))
    return data or prepare_data(cfg.data, progress=False)


def _explicit(run_dir: Path, path: Path) -> list[Path]:
    """--resume-from PATH: that checkpoint; this run's later ones are set aside (rank 0)."""
    step = int(read_meta(path)["step"])
    for later in list_checkpoints(run_dir):
        if checkpoint_step(later) > step:
            set_aside(later, f"newer than --resume-from {path}", "superseded")
    return [path]


def _resume_from(run_dir: Path, resume: bool, checkpoint: Path | None) -> list[Path]:
    """The checkpoints to try on rank 0, or a clear error when resuming finds none."""
    if checkpoint is not None:
        return _explicit(run_dir, checkpoint)
    if not resume:
        if latest_checkpoint(run_dir) is not None:
            raise MegamoeError(
                f"train.run_dir: {run_dir} already holds checkpoints; pass --resume or choose another run dir"
            )
        return []
    found = resume_candidates(run_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoints_root(run_dir)}")
    return found


def _claim(run_dir: Path, cfg: Config, resume: bool, checkpoint: Path | None) -> list[Path]:
    """Lock the run dir for this process's life, then pick the checkpoints to try (rank 0).

    The lock keeps two trainings out of one run dir: ranks of a launcher that was killed outright
    train on to their next step boundary and save there, while a user may already have restarted.
    The restart waits for them (logged, bounded by parallel.timeout_s), then resumes from their save.
    """
    what = f"training in {run_dir} (an earlier launch; it stops at its next step and saves)"
    hold_for_life(run_dir / LOCK_FILE, cfg.parallel.timeout_s, what)
    remove_stale_temps(run_dir)  # files of a writer killed mid-write (metrics truncation, config)
    return _resume_from(run_dir, resume, checkpoint)


def setup_run(cfg: Config, resume: bool, progress: bool = True, checkpoint: Path | None = None) -> RunSetup:
    """Pick the run dir, choose the checkpoint(s) to resume from, prepare data, save the config (rank 0).

    checkpoint: a checkpoint the user named (--resume-from); otherwise --resume tries the newest valid one.
    """
    run_dir = Path(str(from_main(str(choose_run_dir(cfg)))))
    found = on_main(lambda: [str(p) for p in _claim(run_dir, cfg, resume, checkpoint)])
    resume_from = [Path(p) for p in from_main(found)]
    data = _prepare_once(cfg, progress)
    cfg = with_vocab(cfg, data.vocab_size, str(data.tokenizer_path))
    cfg.train.run_dir = str(run_dir)
    cfg.train.name = cfg.train.name or run_dir.name
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        shutil.copyfile(data.tokenizer_path, run_dir / TOKENIZER_FILE)
    barrier()
    return RunSetup(cfg, run_dir, data, resume_from, checkpoint is not None)
