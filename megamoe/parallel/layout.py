"""The parallel layout of a run, resolved and checked against the world size before any process starts.

Attention and dense layers use TP × DP = world. Experts use the folded plan EP × ETP × EDP = world.
Every check raises a ConfigError that names the config keys and their values.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamoe.config import Config
from megamoe.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Resolved degrees of one run."""

    world: int
    tp: int
    dp: int
    ep: int
    etp: int
    edp: int
    sp: bool
    micro_batches: int
    """Gradient-accumulation steps per optimizer step on each rank (with PP: the pipeline's micro-batches)."""
    pp: int = 1
    """Pipeline stages (ranks along the pipeline)."""
    vpp: int = 1
    """Model chunks per pipeline rank (interleaved schedule)."""

    def describe(self) -> str:
        """A compact name such as tp2-dp2-sp (pp2-tp2-dp2 with pipeline stages)."""
        parts = [f"pp{self.pp}" + (f"v{self.vpp}" if self.vpp > 1 else "")] if self.pp > 1 else []
        parts += [f"tp{self.tp}", f"dp{self.dp}"] + (["sp"] if self.sp else [])
        if self.ep > 1 or self.etp > 1:
            parts += [f"ep{self.ep}", f"etp{self.etp}"]
        return "-".join(parts)


def _require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless ok."""
    if not ok:
        raise ConfigError(key, message)


def resolve_layout(cfg: Config, world: int) -> Layout:
    """The layout of cfg on `world` ranks, or a ConfigError naming what does not fit."""
    par, model, train = cfg.parallel, cfg.model, cfg.train
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    degrees = tp * pp * max(par.data_parallel, 1) * par.expert_parallel * par.expert_tensor_parallel
    _require(
        world > 1 or degrees == 1,
        "parallel",
        f"tensor_parallel={tp}, pipeline_parallel={pp}, data_parallel={par.data_parallel}, "
        f"expert_parallel={par.expert_parallel}, expert_tensor_parallel={par.expert_tensor_parallel} need several "
        "processes, but this is a single one: launch with `torchrun --nproc-per-node N -m megamoe train ...` "
        "(launch/torchrun.sh)",
    )
    both = f"parallel.tensor_parallel ({tp}) × parallel.pipeline_parallel ({pp})" if pp > 1 else f"({tp})"
    _require(world % (tp * pp) == 0, "parallel.tensor_parallel", f"{both} must divide the world size ({world})")
    dp = par.data_parallel or world // (tp * pp)
    _require(
        tp * dp * pp == world,
        "parallel.data_parallel",
        f"parallel.pipeline_parallel ({pp}) × parallel.tensor_parallel ({tp}) × parallel.data_parallel ({dp}) = "
        f"{tp * dp * pp} must equal the world size ({world})",
    )
    _check_tp_divides(cfg, tp)
    expert, stage = par.expert_parallel * par.expert_tensor_parallel, world // pp
    _require(
        stage % expert == 0,
        "parallel.expert_parallel",
        f"parallel.expert_parallel ({par.expert_parallel}) × parallel.expert_tensor_parallel "
        f"({par.expert_tensor_parallel}) = {expert} must divide the ranks of a pipeline stage ({stage})",
    )
    per_step = train.micro_batch_size * dp
    _require(
        train.global_batch_size % per_step == 0,
        "train.global_batch_size",
        f"({train.global_batch_size}) must be a multiple of train.micro_batch_size ({train.micro_batch_size}) "
        f"× data-parallel degree ({dp}) = {per_step}",
    )
    if cfg.moe.enabled:
        _check_experts(cfg, tp)
    if par.sequence_parallel:
        _require(
            model.seq_len % tp == 0,
            "model.seq_len",
            f"({model.seq_len}) must be divisible by parallel.tensor_parallel ({tp}) with sequence parallelism",
        )
    micro_batches = train.global_batch_size // per_step
    if pp > 1 or par.virtual_stages > 1:
        check_pipeline(cfg, micro_batches)
    return Layout(
        world=world, tp=tp, dp=dp, ep=par.expert_parallel, etp=par.expert_tensor_parallel, edp=stage // expert,
        sp=par.sequence_parallel, micro_batches=micro_batches, pp=pp, vpp=par.virtual_stages,
    )  # fmt: skip


def check_pipeline(cfg: Config, micro_batches: int) -> None:
    """Pipeline constraints: chunks cover the blocks, enough micro-batches, ZeRO stage 0."""
    from megamoe.parallel.stages import split_layers

    par, train = cfg.parallel, cfg.train
    chunks = par.pipeline_parallel * par.virtual_stages
    split_layers(cfg, chunks)  # raises on a bad parallel.pipeline_split
    _require(
        par.zero_stage == 0,
        "parallel.zero_stage",
        f"({par.zero_stage}) must be 0 with parallel.pipeline_parallel > 1: gradients are all-reduced over "
        "data parallel after the pipeline schedule (ZeRO 1/2 through DeepSpeed are refused with pipelines)",
    )
    _require(
        train.pipeline_microbatches in (0, micro_batches),
        "train.pipeline_microbatches",
        f"({train.pipeline_microbatches}) must equal train.global_batch_size / (train.micro_batch_size × "
        f"data-parallel degree) = {micro_batches} (or 0 for that)",
    )
    _require(
        micro_batches >= par.pipeline_parallel,
        "train.global_batch_size",
        f"gives {micro_batches} pipeline micro-batches per data-parallel rank; the pipeline needs at least "
        f"parallel.pipeline_parallel ({par.pipeline_parallel}): raise it or lower train.micro_batch_size",
    )
    if par.pipeline_schedule == "interleaved_1f1b":
        _require(
            micro_batches % par.pipeline_parallel == 0,
            "train.global_batch_size",
            f"gives {micro_batches} micro-batches; interleaved 1F1B needs a multiple of parallel.pipeline_parallel "
            f"({par.pipeline_parallel})",
        )


def _check_lory(cfg: Config, tp: int) -> None:
    """Lory splits every expert's F over EP and gives each TP rank whole sequences."""
    moe, par = cfg.moe, cfg.parallel
    hidden = moe.expert_hidden_size or cfg.model.ffn_hidden
    _require(
        par.expert_tensor_parallel == 1,
        "parallel.expert_tensor_parallel",
        "must be 1 for lory: its experts are split along F over parallel.expert_parallel (expert-wise MP)",
    )
    _require(
        hidden % par.expert_parallel == 0,
        "moe.expert_hidden_size",
        f"({hidden}) must be divisible by parallel.expert_parallel ({par.expert_parallel}): lory splits F over EP",
    )
    _require(
        cfg.train.micro_batch_size % tp == 0,
        "train.micro_batch_size",
        f"({cfg.train.micro_batch_size}) must be divisible by parallel.tensor_parallel ({tp}): "
        "lory gives each TP rank whole sequences",
    )


def _check_experts(cfg: Config, tp: int) -> None:
    """Experts divide over EP, each expert's FFN over ETP, and TP can split the sequence for routing."""
    moe, par = cfg.moe, cfg.parallel
    if moe.routing == "lory":
        return _check_lory(cfg, tp)
    hidden = moe.expert_hidden_size or cfg.model.ffn_hidden
    _require(
        moe.num_experts % par.expert_parallel == 0,
        "moe.num_experts",
        f"({moe.num_experts}) must be divisible by parallel.expert_parallel ({par.expert_parallel})",
    )
    _require(
        hidden % par.expert_tensor_parallel == 0,
        "moe.expert_hidden_size",
        f"({hidden}) must be divisible by parallel.expert_tensor_parallel ({par.expert_tensor_parallel})",
    )
    _require(
        cfg.model.seq_len % tp == 0,
        "model.seq_len",
        f"({cfg.model.seq_len}) must be divisible by parallel.tensor_parallel ({tp}): "
        "MoE blocks route one sequence slice per TP rank",
    )


def _check_tp_divides(cfg: Config, tp: int) -> None:
    """Every dimension that tensor parallelism splits is divisible by tp."""
    model = cfg.model
    splits = {
        "model.num_heads": model.num_heads,
        "model.num_kv_heads": model.kv_heads,
        "model.ffn_hidden_size": model.ffn_hidden,
    }
    for key, value in splits.items():
        _require(value % tp == 0, key, f"({value}) must be divisible by parallel.tensor_parallel ({tp})")
    if model.vocab_size:
        _require(
            model.vocab_size % tp == 0,
            "model.vocab_size",
            f"({model.vocab_size}, padded) must be divisible by parallel.tensor_parallel ({tp}); "
            f"make model.vocab_multiple a multiple of {tp}",
        )
