"""Checkpoints: torch.distributed.checkpoint (DCP) folders, written atomically.

<run_dir>/checkpoints/step_00000100/
    .metadata, *.distcp   model and optimizer tensors, RNG states (DCP; tensors only)
    meta.json             step, tokens seen, the model config, format version
A checkpoint is written into a hidden temp folder and renamed once complete, so a crash or a
preemption mid-save never corrupts the newest good one; `latest_checkpoint` ignores anything
without meta.json.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megamoe.errors import CheckpointError
from megamoe.utils.fs import atomic_dir, atomic_write_json, remove_stale_temps

FORMAT_VERSION = 1
PREFIX = "step_"
SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Silence DCP's warning for single-process saves/loads (an intended mode here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield


def checkpoints_root(run_dir: Path) -> Path:
    """Folder holding all checkpoints of a run."""
    return run_dir / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    """Folder of the checkpoint taken after `step` optimizer steps."""
    return checkpoints_root(run_dir) / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / "meta.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, if any."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _rng_state() -> dict[str, torch.Tensor]:
    """RNG states as tensors (DCP stores tensors only)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore RNG states saved by _rng_state."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, keep: int
) -> Path:
    """Write the checkpoint of `step` atomically, then delete all but the newest `keep`."""
    final = step_dir(run_dir, step)
    if final.exists():
        return final
    remove_stale_temps(checkpoints_root(run_dir))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with atomic_dir(final) as tmp:
        with _quiet_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd, "rng": _rng_state()}, checkpoint_id=tmp)
        atomic_write_json(tmp / "meta.json", {**meta, "step": step, "format_version": FORMAT_VERSION})
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint, or a clear error."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable megamoe checkpoint ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def check_compatible(path: Path, saved: dict, current: dict, section: str = "model") -> None:
    """Raise if a checkpoint's config section differs from the current one."""
    diffs = [
        f"{section}.{k}={saved.get(k)!r} (config has {current.get(k)!r})"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(f"{path}: checkpoint is incompatible with the config: " + ", ".join(diffs))


def _describe(err: BaseException) -> str:
    """The root cause of a DCP failure in a few words."""
    failures = getattr(err, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first  # (exception, stack summary)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, model_cfg: dict) -> dict:
    """Restore model, optimizer and RNG from a checkpoint; returns its meta."""
    meta = read_meta(path)
    check_compatible(path, meta.get("model", {}), model_cfg)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(f"{path}: checkpoint is corrupt or incomplete ({_describe(err)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _set_rng_state(state["rng"])
    return meta
