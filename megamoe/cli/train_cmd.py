"""`megamoe train`: train (or resume) one run, single-process or under torchrun/SLURM.

`--dry-run [--world-size N] [--device-memory 80GB]` checks the parallel layout for N ranks and prints
the resolved config with total, active and per-rank parameter counts and the per-rank memory plan
(megamoe.parallel.memory), without starting any process.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megamoe.errors import CheckpointError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("train", help="train a model (no arguments: the tiny default on the embedded corpus)")
    p.add_argument("args", nargs="*", metavar="CONFIG|RUN_DIR|key=value", help="a YAML file or run dir, and overrides")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in train.run_dir")
    p.add_argument(
        "--resume-from", metavar="CHECKPOINT", default=None,
        help="continue from this checkpoint folder (this run's later checkpoints are set aside)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts, then exit")
    p.add_argument("--world-size", type=int, default=None, help="with --dry-run: validate the layout for N ranks")
    p.add_argument(
        "--device-memory", metavar="SIZE", default=None,
        help="with --dry-run: say whether the worst rank's memory plan fits SIZE (80GB, 141GiB, 512MB)",
    )  # fmt: skip
    p.set_defaults(func=run)


def dry_run(cfg, world: int, device_memory: str | None = None) -> int:
    """Validate the layout for `world` ranks; print the config, parameter counts and the per-rank memory plan."""
    from megamoe.config import config_to_yaml
    from megamoe.config.resolve import with_vocab
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.model.params import flops_per_token, meta_counts
    from megamoe.parallel.layout import resolve_layout
    from megamoe.parallel.memory import format_plan, parse_bytes, plan_memory

    capacity = parse_bytes(device_memory) if device_memory is not None else None
    if cfg.data.tokenizer:
        vocab, source = load_tokenizer(cfg.data.tokenizer).get_vocab_size(), cfg.data.tokenizer
    else:
        vocab, source = cfg.data.vocab_size, "data.vocab_size"
    cfg = with_vocab(cfg, vocab, source)
    layout = resolve_layout(cfg, world)
    from megamoe.parallel.specs import ShardShapeFactory  # imports megatron-core: after validation

    counts = meta_counts(cfg.model, moe=cfg.moe)
    per_rank = meta_counts(cfg.model, ShardShapeFactory(layout.tp, ep_size=layout.ep, etp_size=layout.etp), cfg.moe)
    print(config_to_yaml(cfg), end="")
    print(f"# layout: {layout.describe()} on {world} rank(s), {layout.micro_batches} micro-batch(es) per step")
    print(f"# parameters: total {counts.total:,} | active {counts.active:,} | embedding {counts.embedding:,}")
    print(f"# parameters per rank: {per_rank.total:,} (model replicas: {layout.dp})")
    print(f"# training FLOPs per token: {flops_per_token(cfg.model, counts, cfg.moe):,.0f}")
    print("\n".join(format_plan(plan_memory(cfg, layout), capacity)))
    return 0


def run(args: argparse.Namespace) -> int:
    """Train, or print the dry run."""
    from megamoe.cli.main import split_config_args
    from megamoe.parallel.groups import launched_world_size
    from megamoe.parallel.layout import resolve_layout
    from megamoe.train.run import load_run_config

    cfg = load_run_config(*split_config_args(args.args))
    world = launched_world_size()
    if args.dry_run:
        return dry_run(cfg, args.world_size or world, args.device_memory)
    layout = resolve_layout(cfg, world)
    checkpoint = Path(args.resume_from) if args.resume_from else None
    if checkpoint is not None and not (checkpoint / "meta.json").is_file():
        raise CheckpointError(f"--resume-from: {checkpoint} is not a checkpoint folder (no meta.json)")
    return _train(cfg, layout, args.resume, checkpoint)


def _train(cfg, layout, resume: bool, checkpoint: Path | None) -> int:
    """Set up the process groups, train, tear them down (a preemption notice counts from here on)."""
    from megamoe.parallel.groups import destroy_groups, init_groups, local_groups
    from megamoe.train.preempt import PreemptionFlag
    from megamoe.train.run import setup_run
    from megamoe.train.trainer import Trainer, pick_device

    with PreemptionFlag() as preempt:
        if layout.world > 1:
            groups = init_groups(layout, cfg.parallel.timeout_s, cfg.train.seed)
            if not groups.is_main:
                logging.getLogger().setLevel(logging.WARNING)
        else:
            groups = local_groups(layout, pick_device(cfg.train.device))
        try:
            setup = setup_run(cfg, resume, cfg.logging.progress and groups.is_main, checkpoint)
            summary = Trainer(setup, groups).fit(preempt)
        finally:
            if layout.world > 1:
                destroy_groups()
    if groups.is_main:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    """The closing lines: validation perplexity against the unigram floor, and the run dir."""
    if "eval/ppl" in summary:
        print(
            f"validation perplexity {summary['eval/ppl']:.2f} (loss {summary['eval/loss']:.4f}) "
            f"after {summary['step']} steps / {summary['tokens']:,} tokens; "
            f"unigram baseline {summary['unigram_val_ppl']:.2f}"
        )
    if summary.get("preempted"):
        print(f"stopped by {summary['preempted']} at step {summary['step']}; resume with --resume")
    print(f"run directory: {summary['run_dir']}")
