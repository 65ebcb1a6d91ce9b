"""Checkpoints: torch.distributed.checkpoint (DCP) folders, written atomically, reshardable.

<run_dir>/checkpoints/step_00000100/
    .metadata, *.distcp   model parameters and AdamW moments, by parameter name, at their
                          full (single-device) shapes; model state buffers (aux_free's expert
                          biases, replicated); RNG state
    meta.json             step, tokens seen, the model config, the layout it was written at
Under tensor parallelism every tensor is a DTensor over the (dp, tp) device mesh, sharded the way
its parameter is, so DCP writes each slice once and a later run at any other layout (or a single
process) reads back exactly the slices it holds. The optimizer moments are saved unpartitioned
(ZeRO partitions gathered), so they reshard the same way.

A checkpoint is written into a hidden temp folder (`.step_N.tmp-save`) and renamed by rank 0 once
every rank's shards are in and fsynced, so a kill, a full disk or a preemption mid-save never
corrupts the newest good one; the next save removes what a killed writer left. Old checkpoints are
pruned by renaming them to a hidden temp name first, so a kill mid-prune leaves no half-deleted
checkpoint under a `step_N` name; the steps of train.checkpoint_steps are pinned, never pruned.
Weights that are not finite are never saved.
`meta.json` records every file's size and CRC-32. `latest_checkpoint` ignores anything without
meta.json; resuming picks the newest *valid* one (`resume_candidates`, `problem`, `checksum_problem`):
a truncated, unreadable or altered checkpoint is set aside as `step_N.invalid` with a warning, kept
for inspection. Loading never unpickles arbitrary objects:
tensors are read with weights_only=True, and DCP's .metadata file with an allowlisting unpickler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import warnings
import zlib
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.tensor import DTensor, Replicate, Shard

from megamoe.config import ModelConfig, MoEConfig
from megamoe.errors import CheckpointError, CorruptCheckpointError, NonFiniteError
from megamoe.model.moe.balance import expert_biases
from megamoe.train.dist import any_rank, barrier, from_main, gather, is_main
from megamoe.utils.fs import atomic_write_json, fsync_path, remove_stale_temps

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
PREFIX = "step_"
NAME = re.compile(r"step_\d{8}")
"""A complete checkpoint's folder name; temp, pruned and set-aside folders never match it."""
SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class Engine(Protocol):
    """What a checkpoint needs from PlainEngine / ZeroEngine."""

    def optimizer_state(self) -> dict[str, torch.Tensor]: ...
    def load_state(self, params: dict[str, torch.Tensor], optim: dict[str, torch.Tensor], step: int) -> None: ...


def checkpoints_root(run_dir: Path) -> Path:
    """Folder holding all checkpoints of a run."""
    return run_dir / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    """Folder of the checkpoint taken after `step` optimizer steps."""
    return checkpoints_root(run_dir) / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (folders named step_N holding meta.json), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if NAME.fullmatch(p.name) and (p / "meta.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, if any."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Silence DCP's warning for single-process saves/loads (an intended mode here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield


def _global(tensor: torch.Tensor, param: nn.Parameter, meshes: dict | None) -> torch.Tensor:
    """tensor (shaped like param on this rank) as a global DTensor, or itself in a single process.

    Dense parameters live on the (dp, tp) mesh, experts on the (edp, ep, etp) mesh; each mesh axis
    the parameter is split over (its `shards`) becomes a Shard placement, the others Replicate.
    """
    if meshes is None:
        return tensor
    mesh = meshes["expert" if getattr(param, "expert", False) else "dense"]
    dims = {axis: dim for axis, dim, _, _ in getattr(param, "shards", ())}
    placements = [Shard(dims[name]) if name in dims else Replicate() for name in mesh.mesh_dim_names]
    return DTensor.from_local(tensor, mesh, placements, run_check=False)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly distributed) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _state(model: nn.Module, model_part: dict, optim_part: dict, meshes: dict | None) -> dict:
    """The DCP state dict: model and optimizer tensors by parameter name, plus RNG."""
    params = dict(model.named_parameters())
    state = {
        "model": {name: _global(t, params[name], meshes) for name, t in model_part.items()},
        "optim": {key: _global(t, params[key.rsplit(".", 1)[0]], meshes) for key, t in optim_part.items()},
        "rng": {"cpu": torch.get_rng_state()},
    }
    if buffers := expert_biases(model):  # replicated model state (aux_free's expert biases): saved once, read by all
        state["buffers"] = buffers
    return state


def _crc32(path: Path) -> int:
    """CRC-32 of a file's bytes."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_sums(folder: Path) -> dict[str, list[int]]:
    """[size, crc32] of the files this rank wrote into a DCP folder (its `__<rank>_*` shards; rank 0: .metadata)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    names = [p.name for p in folder.glob(f"__{rank}_*")] + ([".metadata"] if rank == 0 else [])
    return {name: [(folder / name).stat().st_size, _crc32(folder / name)] for name in names}


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder (step_N) was written at."""
    return int(path.name.removeprefix(PREFIX))


def _prune(run_dir: Path, keep: int, pinned: Collection[int] = ()) -> None:
    """Delete all but the newest `keep` unpinned checkpoints (pinned steps stay); each is first renamed away."""
    unpinned = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) not in pinned]
    for old in unpinned[:-keep]:
        doomed = old.parent / f".{old.name}.tmp-prune"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _check_finite(model: nn.Module, step: int) -> None:
    """Refuse (on every rank) to checkpoint weights that are not all finite."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if any_rank(bool(bad)):
        where = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} on this rank)" if bad else ""
        raise NonFiniteError(f"step {step}: the weights are not finite{where}; no checkpoint was written")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    engine: Engine,
    meta: dict,
    keep: int,
    meshes: dict | None = None,
    pinned: Collection[int] = (),
) -> Path:
    """Write the checkpoint of `step` (collectively), atomically; keep the newest `keep` and every pinned step."""
    final = step_dir(run_dir, step)
    main = is_main()
    if from_main(final.exists()):
        return final
    _check_finite(model, step)
    tmp = final.parent / f".{final.name}.tmp-save"
    if main:
        remove_stale_temps(final.parent)  # what a killed save or prune left behind
        tmp.mkdir(parents=True)
    barrier()
    skip = getattr(model, "checkpoint_skip", set())  # a pipeline rank's copies of parameters another rank saves
    model_part = {name: p.detach() for name, p in model.named_parameters() if name not in skip}
    optim_part = {key: t for key, t in engine.optimizer_state().items() if key.rsplit(".", 1)[0] not in skip}
    try:
        try:
            with _quiet_dcp():
                dcp.save(_state(model, model_part, optim_part, meshes), checkpoint_id=tmp)
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            newest, free_mib = latest_checkpoint(run_dir), shutil.disk_usage(final.parent).free / 2**20
            raise CheckpointError(  # a full disk often surfaces as a torch serializer error: say how full
                f"{final}: could not write the checkpoint ({_describe(err)}; {free_mib:.1f} MiB free on its "
                f"filesystem); the newest complete checkpoint is {newest or 'none'}"
            ) from None
        files = {name: sums for part in gather(_file_sums(tmp)) for name, sums in part.items()}
        if main:
            record = {**meta, "step": step, "format_version": FORMAT_VERSION, "files": files}
            atomic_write_json(tmp / "meta.json", record)
            os.rename(tmp, final)
            fsync_path(final.parent)
            _prune(run_dir, keep, pinned)
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return final


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint, or a clear error."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{path}: not a readable megamoe checkpoint ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


ARCHITECTURE = ("model", "moe")
"""Config sections a checkpoint must match: they decide which parameters exist and their shapes."""


STARTUP_ONLY = {"model": ("init_from",), "moe": ("upcycle_noise",)}
"""Keys that act once, when a run starts (not part of the architecture a resume must match)."""


def architecture(cfg) -> dict[str, dict]:
    """The architecture sections of a Config as plain dicts (stored in, and checked against, checkpoints)."""
    sections = {section: dataclasses.asdict(getattr(cfg, section)) for section in ARCHITECTURE}
    for section, keys in STARTUP_ONLY.items():
        for key in keys:
            sections[section].pop(key, None)
    return sections


def _defaults() -> dict[str, dict]:
    """The default value of every architecture key (a checkpoint older than a key was saved with it)."""
    return {"model": dataclasses.asdict(ModelConfig()), "moe": dataclasses.asdict(MoEConfig())}


def check_compatible(path: Path, meta: dict, current: dict[str, dict]) -> None:
    """Raise if a checkpoint's architecture sections differ from the current config.

    A key the checkpoint lacks (it was added to megamoe later) matches its default value.
    """
    diffs, defaults = [], _defaults()
    for section, values in current.items():
        saved = {**defaults.get(section, {}), **meta.get(section, {})}
        diffs += [
            f"{section}.{k}={saved.get(k)!r} (config has {values.get(k)!r})"
            for k in sorted(set(meta.get(section, {})) | set(values))
            if saved.get(k) != values.get(k)
        ]
    if diffs:
        raise CheckpointError(f"{path}: checkpoint is incompatible with the config: " + ", ".join(diffs))


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: only its own classes, torch sizes, dtypes and layouts, paths."""

    MODULES = frozenset({"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"})
    NAMES = frozenset({
        ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset"),
    })  # fmt: skip

    def find_class(self, module: str, name: str):
        if module in self.MODULES or (module, name) in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeReader(FileSystemReader):
    """DCP reader whose .metadata is read with the allowlisting unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
            metadata = _SafeUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _describe(err: BaseException) -> str:
    """The root cause of a DCP failure in a few words."""
    failures = getattr(err, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first  # (exception, stack summary)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@torch.no_grad()
def load_checkpoint(
    path: Path, model: nn.Module, engine: Engine, arch: dict[str, dict], meshes: dict | None = None
) -> dict:
    """Restore parameters, optimizer moments, step and RNG from a checkpoint of any layout; returns meta.

    arch holds the current config's architecture sections ({"model": ..., "moe": ...}).
    """
    meta = read_meta(path)
    check_compatible(path, meta, arch)
    model_part = {name: torch.empty_like(p) for name, p in model.named_parameters()}
    optim_part = {key: torch.empty_like(t) for key, t in engine.optimizer_state().items()}
    state = _state(model, model_part, optim_part, meshes)
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=path, storage_reader=SafeReader(path))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CorruptCheckpointError(f"{path}: checkpoint is corrupt or incomplete ({_describe(err)})") from None
    params = {name: _local(t) for name, t in state["model"].items()}
    updates = int(meta.get("optimizer_steps", meta["step"]))  # fewer than steps when updates were skipped
    engine.load_state(params, {k: _local(v) for k, v in state["optim"].items()}, updates)
    torch.set_rng_state(state["rng"]["cpu"])
    return meta


def problem(path: Path) -> str | None:
    """What makes a checkpoint unusable without loading it (unreadable meta or index, missing or short files)."""
    try:
        meta = read_meta(path)
        metadata = SafeReader(path).read_metadata()
    except (CheckpointError, OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    needed.update({name: size for name, (size, _) in meta.get("files", {}).items()})
    for name, size in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else -1
        if have < size:
            return f"{name} is missing" if have < 0 else f"{name} is truncated ({have} of {size} bytes)"
    return None


def checksum_problem(path: Path) -> str | None:
    """A file whose CRC-32 differs from the one recorded at save time (collective: each rank reads a share)."""
    files = sorted(read_meta(path).get("files", {}).items())
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    bad = [name for name, (_, crc) in files[rank::world] if not (path / name).is_file() or _crc32(path / name) != crc]
    return next((f"{found[0]} is missing or fails its checksum" for found in gather(bad) if found), None)


def set_aside(path: Path, why: str, kind: str = "invalid") -> Path:
    """Rename a checkpoint that must not be resumed from to step_N.<kind>[-k] (kept, never loaded); returns it."""
    target, k = path.with_name(f"{path.name}.{kind}"), 1
    while target.exists():
        target, k = path.with_name(f"{path.name}.{kind}-{k}"), k + 1
    os.rename(path, target)
    log.warning("resume: skipping %s (%s); moved to %s, kept for inspection", path, why, target.name)
    return target


def resume_candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoints newest first, after setting aside the newest ones that fail `problem` (rank 0 only)."""
    found = list_checkpoints(run_dir)[::-1]
    while found and (why := problem(found[0])) is not None:
        set_aside(found.pop(0), why)
    return found
