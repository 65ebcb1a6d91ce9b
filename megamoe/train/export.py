"""Export a run to a single-device model folder: model.safetensors + config.json + tokenizer.json.

Any checkpoint layout works: the checkpoint is resharded into one plain model on load. Reading an
export back never unpickles anything (safetensors + JSON).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megamoe import __version__
from megamoe.config import ModelConfig, MoEConfig
from megamoe.errors import CheckpointError, MegamoeError
from megamoe.model import Transformer, build_model
from megamoe.model.layers import Rotary
from megamoe.train.checkpoint import architecture, latest_checkpoint, load_checkpoint
from megamoe.train.engine import PlainEngine
from megamoe.train.run import TOKENIZER_FILE, load_run_config
from megamoe.utils.fs import atomic_dir, atomic_write_json

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def load_run_model(run_dir: Path, checkpoint: Path | None = None) -> tuple[Transformer, dict]:
    """A run's checkpoint (newest by default) as one single-device model, and the checkpoint's meta."""
    cfg = load_run_config(str(run_dir), [])
    path = checkpoint or latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to export")
    model = build_model(cfg.model, cfg.train.seed, moe=cfg.moe)
    meta = load_checkpoint(path, model, PlainEngine(model, cfg.optim, 1, False), architecture(cfg))
    return model.eval(), {**meta, "checkpoint": str(path)}


def export_run(run_dir: Path, out: Path, checkpoint: Path | None = None) -> Path:
    """Write the export folder `out` (which must not exist yet) atomically."""
    if out.exists():
        raise MegamoeError(f"--out: {out} already exists; choose a new folder")
    model, meta = load_run_model(run_dir, checkpoint)
    with atomic_dir(out) as tmp:
        weights = {name: p.detach().contiguous() for name, p in model.named_parameters()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "megamoe": __version__})
        atomic_write_json(
            tmp / CONFIG,
            {"architecture": "megamoe-decoder", "megamoe_version": __version__, "model": dataclasses.asdict(model.cfg),
             "moe": dataclasses.asdict(model.moe_cfg), "step": meta["step"], "tokens": meta.get("tokens"),
             "checkpoint": meta["checkpoint"]},
        )  # fmt: skip
        shutil.copyfile(run_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    return out


def load_exported(folder: Path) -> Transformer:
    """The model of an export folder (strict: every weight present, nothing extra)."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder}: not a megamoe export ({err})") from None
    with torch.device("meta"):
        model = Transformer(ModelConfig(**config["model"]), moe=MoEConfig(**config.get("moe", {})))
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True, assign=True)
    model.rotary = Rotary(model.cfg.head_dim, model.cfg.seq_len, model.cfg.rope_theta)  # buffers, not weights
    return model.eval()
