"""`megamoe import-hf DIR --out RUN_DIR`: a local HF dense checkpoint (Llama, Mistral, Qwen2) → a megamoe run.

The run directory gets config.yaml (the model section derived from DIR/config.json, the user's
CONFIG and key=value overrides on top), tokenizer.json (DIR's), and checkpoints/step_00000000 with the
imported weights (upcycled when the config is MoE) and zero Adam moments, so `megamoe train RUN_DIR
--resume` continues from it and `model.init_from=RUN_DIR` starts new runs from it. Every
unsupported architecture, shape or file is one error line naming the HF config key or file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

from megamoe.config import Config, load_config, save_config
from megamoe.data.prepare import cache_key
from megamoe.data.tokenizer import eod_id, load_tokenizer
from megamoe.errors import CheckpointError, ConfigError
from megamoe.interop.hf_config import model_fields
from megamoe.interop.hf_weights import read_dense_state
from megamoe.model import build_model
from megamoe.train.checkpoint import architecture, latest_checkpoint, save_checkpoint
from megamoe.train.engine import PlainEngine
from megamoe.train.init_from import load_weights
from megamoe.train.run import CONFIG_FILE, TOKENIZER_FILE
from megamoe.utils.fs import remove_stale_temps

log = logging.getLogger(__name__)


def read_hf_config(folder: Path) -> dict:
    """DIR/config.json as a dict, or a one-line error naming the file."""
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable HF config ({err})") from None


def imported_config(folder: Path, config: str | None, overrides: list[str], out: Path) -> Config:
    """The user's config with the model section taken from DIR/config.json (conflicting user values refused)."""
    user = load_config(config, overrides)
    if user.data.tokenizer:
        raise ConfigError("data.tokenizer", "an import uses the checkpoint's tokenizer.json; leave it unset")
    fields = model_fields(read_hf_config(folder), user.model.seq_len, folder / "config.json")
    default = dataclasses.asdict(type(user.model)())
    for key, value in fields.items():
        mine = getattr(user.model, key)
        if key != "seq_len" and mine != default[key] and mine != value:
            raise ConfigError(f"model.{key}", f"set to {mine!r}, but the checkpoint has {value!r}; leave it unset")
    cfg = dataclasses.replace(user, model=dataclasses.replace(user.model, **fields))
    cfg.data.tokenizer, cfg.train.run_dir = str(out / TOKENIZER_FILE), str(out)
    cfg.train.name = cfg.train.name or out.name
    cfg.validate()
    return cfg


def check_tokenizer(folder: Path, vocab_size: int) -> None:
    """DIR/tokenizer.json loads, has an end-of-document token, and fits in the embedding."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; import needs the fast tokenizer file of the checkpoint")
    tok = load_tokenizer(path, key=str(path))
    eod_id(tok, str(path))
    if tok.get_vocab_size() > vocab_size:
        raise CheckpointError(
            f"{path}: {tok.get_vocab_size()} tokens, more than vocab_size {vocab_size} in {folder / 'config.json'}"
        )


def import_hf(folder: Path, out: Path, config: str | None = None, overrides: list[str] = ()) -> Path:
    """Write the run directory `out` from the HF checkpoint in `folder`; returns its step-0 checkpoint."""
    if (out / CONFIG_FILE).exists() or latest_checkpoint(out) is not None:
        raise CheckpointError(f"--out: {out} already holds a run; choose a new folder")
    cfg = imported_config(folder, config, list(overrides), out)
    check_tokenizer(folder, cfg.model.vocab_size)
    dense = read_dense_state(folder, cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.train.seed, moe=cfg.moe)
    engine = PlainEngine(model, cfg.optim, 1, False)
    load_weights(model, engine, cfg, dense, source_moe=False)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    shutil.copyfile(folder / TOKENIZER_FILE, out / TOKENIZER_FILE)
    meta = {**architecture(cfg), "data_key": cache_key(cfg.data), "tokens": 0, "train_loss": None,
            "optimizer_steps": 0, "layout": "imported", "imported_from": str(folder.resolve())}  # fmt: skip
    path = save_checkpoint(out, 0, model, engine, meta, cfg.train.keep_checkpoints)
    save_config(cfg, out / CONFIG_FILE)  # last: a killed import leaves no run behind, and can be rerun
    log.info("imported %s into %s (%s)", folder, path, cfg.moe.routing if cfg.moe.enabled else "dense")
    return path
