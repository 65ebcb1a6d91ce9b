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
from megamoe.errors import MegamoeError
from megamoe.train.checkpoint import latest_checkpoint
from megamoe.train.dist import barrier, from_main, is_main

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class RunSetup:
    """Everything a trainer needs that is decided before it starts."""

    cfg: Config
    run_dir: Path
    data: PreparedData
    resume_from: Path | None


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
    """Rank 0 prepares the data; the other ranks wait, then reuse its cache."""
    data = prepare_data(cfg.data, progress=progress) if is_main() else None
    barrier()
    return data or prepare_data(cfg.data, progress=False)


def setup_run(cfg: Config, resume: bool, progress: bool = True) -> RunSetup:
    """Pick the run dir, check resume/overwrite, prepare data, save the resolved config (rank 0)."""
    run_dir = Path(str(from_main(str(choose_run_dir(cfg)))))
    resume_from = latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        raise MegamoeError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise MegamoeError(
            f"train.run_dir: {run_dir} already holds checkpoints; pass --resume or choose another run dir"
        )
    data = _prepare_once(cfg, progress)
    cfg = with_vocab(cfg, data.vocab_size, str(data.tokenizer_path))
    cfg.train.run_dir = str(run_dir)
    cfg.train.name = cfg.train.name or run_dir.name
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        shutil.copyfile(data.tokenizer_path, run_dir / TOKENIZER_FILE)
    barrier()
    return RunSetup(cfg, run_dir, data, resume_from)
