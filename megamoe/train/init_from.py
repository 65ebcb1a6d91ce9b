"""`model.init_from`: a fresh run starts from another run's checkpoint weights, with a fresh optimizer.

The source is a run directory (its newest checkpoint) or one `checkpoints/step_N` folder. When its
config is dense and this run's is MoE, the weights are upcycled (megamoe.model.upcycle); otherwise
every parameter must match by name and shape. Lory then goes through its warm-up switch
(megamoe.train.upcycle: experts ← expert 0 with their moments, fresh router), exactly as a Lory run
does at the end of its dense warm-up. Adam's moments start at zero and its step count at 0. Only a
fresh start reads init_from: a resumed run loads its own checkpoint and ignores it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from megamoe.config import Config
from megamoe.errors import CheckpointError
from megamoe.model import Transformer
from megamoe.model.init import full_shape, initial_value
from megamoe.model.upcycle import is_expert_weight, noise_factor, upcycle_state
from megamoe.train.checkpoint import latest_checkpoint
from megamoe.train.export import load_run_model
from megamoe.train.run import is_run_dir
from megamoe.train.upcycle import UPCYCLE_SEED_OFFSET, upcycle

log = logging.getLogger(__name__)


def source_checkpoint(value: str) -> tuple[Path, Path]:
    """(run dir, checkpoint folder) named by model.init_from, or a one-line error."""
    path = Path(value).expanduser()
    if (path / "meta.json").is_file():
        return path.parent.parent, path
    if not is_run_dir(path):
        raise CheckpointError(
            f"model.init_from: {path} is neither a run directory (config.yaml) nor a checkpoint folder (meta.json)"
        )
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"model.init_from: {path} holds no checkpoint")
    return path, found


def fresh_state(cfg: Config) -> dict[str, torch.Tensor]:
    """Every parameter's initial value at full (single-device) shape, as build_model draws it."""
    with torch.device("meta"):
        model = Transformer(cfg.model, moe=cfg.moe)
    seed, gru_bias = cfg.train.seed, cfg.moe.gru_bias_init
    return {name: initial_value(name, p, cfg.model, seed, gru_bias) for name, p in model.named_parameters()}


def target_state(source: dict[str, torch.Tensor], source_moe: bool, cfg: Config) -> dict[str, torch.Tensor]:
    """This run's full state from the source's: upcycled dense → MoE, else copied name by name."""
    fresh = fresh_state(cfg)
    if cfg.moe.enabled and not source_moe:
        return upcycle_state(source, fresh, cfg.model, cfg.moe)
    for name, tensor in fresh.items():
        have = source.get(name)
        if have is None or have.shape != tensor.shape:
            found = "missing" if have is None else f"of shape {tuple(have.shape)}"
            raise CheckpointError(
                f"model.init_from: the source's {name} is {found}; this config needs {tuple(tensor.shape)} "
                "(start from a dense run, or one of the same architecture)"
            )
    return {name: source[name] for name in fresh}


def local_slice(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """This rank's slice of a full tensor, following the parameter's `shards` (as init does)."""
    for _, dim, rank, world in getattr(param, "shards", ()):
        full = full.chunk(world, dim=dim)[rank]
    return full


@torch.no_grad()
def load_weights(model: nn.Module, engine, cfg: Config, source: dict[str, torch.Tensor], source_moe: bool) -> None:
    """Load source weights (upcycled if dense → MoE) into this rank's model; zero moments, step 0."""
    full = target_state(source, source_moe, cfg)
    params = {name: local_slice(full[name], p).to(p.dtype) for name, p in model.named_parameters()}
    zeros = {key: torch.zeros_like(t) for key, t in engine.optimizer_state().items()}
    engine.load_state(params, zeros, 0)
    if not cfg.moe.enabled or source_moe:
        return
    if cfg.moe.routing == "lory":
        upcycle(model, engine, cfg, 0)
    if cfg.moe.upcycle_noise > 0:
        _perturb(model, engine, cfg)


@torch.no_grad()
def _perturb(model: nn.Module, engine, cfg: Config) -> None:
    """moe.upcycle_noise: every expert weight × (1 + ε·N(0, 1)), layout-independent."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    seed = cfg.train.seed + UPCYCLE_SEED_OFFSET
    for name, p in model.named_parameters():
        if is_expert_weight(name):
            factor = noise_factor(name, full_shape(p), cfg.moe.upcycle_noise, seed)
            params[name] = p * local_slice(factor, p).to(p)
    engine.load_state(params, engine.optimizer_state(), 0)


def init_from(model: nn.Module, engine, cfg: Config) -> Path:
    """Start this (fresh) run from model.init_from's checkpoint; returns the checkpoint used."""
    run_dir, checkpoint = source_checkpoint(cfg.model.init_from)
    rng = torch.get_rng_state()  # loading restores the source's RNG: keep this run's own
    source_model, _ = load_run_model(run_dir, checkpoint)
    torch.set_rng_state(rng)
    source = {name: p.detach() for name, p in source_model.named_parameters()}
    source_moe = source_model.moe_cfg.enabled
    load_weights(model, engine, cfg, source, source_moe)
    upcycled = cfg.moe.enabled and not source_moe
    log.info("model.init_from: started from %s%s", checkpoint, " (upcycled to MoE)" if upcycled else "")
    return checkpoint
