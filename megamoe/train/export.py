"""Export a run to a single-device model folder: model.safetensors + config.json + tokenizer.json.

Any checkpoint layout works: the checkpoint is resharded into one plain model on load. Reading an
export back never unpickles anything (safetensors + JSON).

The folder is written under a hidden temp name next to --out, synced, and renamed, so --out is
either absent or a complete export: a kill -9 or a full disk leaves no half-written export under
its name, and the next export to the same --out removes what a killed one left. An existing --out
is never touched: if it already holds the export of the same checkpoint (a rerun after a kill that
came just after the rename), there is nothing to do; anything else there is refused.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megamoe import __version__
from megamoe.config import ModelConfig, MoEConfig
from megamoe.errors import CheckpointError, MegamoeError
from megamoe.model import Transformer, build_model
from megamoe.model.layers import Rotary
from megamoe.model.moe.balance import expert_biases
from megamoe.train.checkpoint import architecture, latest_checkpoint, load_checkpoint
from megamoe.train.engine import PlainEngine
from megamoe.train.run import TOKENIZER_FILE, load_run_config
from megamoe.utils.fs import atomic_dir, atomic_write_json, disk_full_reason, remove_dead_temps

log = logging.getLogger(__name__)

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


Writer = Callable[[Transformer, dict, Path, Path], None]
"""write(model, checkpoint meta, run dir, folder): the files of one export format, into folder."""


def export_run(run_dir: Path, out: Path, checkpoint: Path | None = None, write: Writer | None = None) -> Path:
    """Write the export folder `out` atomically (or find it already written from the same checkpoint).

    write: the format's writer (default: megamoe's own layout); its config.json records the checkpoint.
    """
    if _already_exported(out, run_dir, checkpoint):
        return out
    model, meta = load_run_model(run_dir, checkpoint)
    if _already_exported(out, run_dir, checkpoint):  # again: loading took a while
        return out
    for stale in remove_dead_temps(out):
        log.info("export: removed %s, left by an export that was killed", stale.name)
    try:
        with atomic_dir(out) as tmp:
            (write or _write)(model, meta, run_dir, tmp)
    except Exception as err:  # safetensors reports a full disk with its own error type, not an OSError
        _explain(err, out)
        raise
    return out


def _already_exported(out: Path, run_dir: Path, checkpoint: Path | None) -> bool:
    """out holds the complete export of this checkpoint (True); absent (False); anything else is refused."""
    if not out.exists():
        return False
    wanted = checkpoint or latest_checkpoint(run_dir)
    try:
        config = json.loads((out / CONFIG).read_text())
        written = Path(config.get("megamoe_export", config)["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        written = None
    weights = (out / WEIGHTS).is_file() or (out / f"{WEIGHTS}.index.json").is_file()
    complete = weights and (out / TOKENIZER_FILE).is_file()
    if wanted is not None and written is not None and complete and written.resolve() == wanted.resolve():
        log.info("export: %s already holds the export of %s; nothing to do", out, wanted)
        return True
    raise MegamoeError(
        f"--out: {out} already exists and is not the export of {wanted or 'this run'}; "
        "choose a new folder (an export never replaces one)"
    )


def _write(model: Transformer, meta: dict, run_dir: Path, folder: Path) -> None:
    """The three files of an export, into folder."""
    weights = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    weights |= {name: b.detach().contiguous() for name, b in expert_biases(model).items()}  # routing state
    # one metadata key: safetensors writes its metadata map in random order, and two exports of one
    # checkpoint must be byte-identical (the megamoe version is in config.json)
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(
        folder / CONFIG,
        {"architecture": "megamoe-decoder", "megamoe_version": __version__, "model": dataclasses.asdict(model.cfg),
         "moe": dataclasses.asdict(model.moe_cfg), "step": meta["step"], "tokens": meta.get("tokens"),
         "checkpoint": meta["checkpoint"]},
    )  # fmt: skip
    shutil.copyfile(run_dir / TOKENIZER_FILE, folder / TOKENIZER_FILE)


def _explain(err: Exception, out: Path) -> None:
    """Turn a full disk, or an --out that appeared meanwhile, into one clear error (nothing was kept)."""
    reason = disk_full_reason(err)
    if reason:
        raise MegamoeError(
            f"--out: {reason} while writing the export {out} (nothing was kept); free space or choose another --out"
        ) from None
    if getattr(err, "errno", None) in (errno.EEXIST, errno.ENOTEMPTY) and out.exists():
        raise MegamoeError(
            f"--out: {out} was created by someone else during the export; it was left untouched"
        ) from None


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
