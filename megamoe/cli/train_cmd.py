"""`megamoe train`: train (or resume) one run; `--dry-run` prints the config and parameter counts."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("train", help="train a model (no arguments: the tiny default on the embedded corpus)")
    p.add_argument("args", nargs="*", metavar="CONFIG|RUN_DIR|key=value", help="a YAML file or run dir, and overrides")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.run_dir")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts, then exit")
    p.set_defaults(func=run)


def dry_run(cfg) -> int:
    """Print the resolved config and the total/active parameter counts without training."""
    from megamoe.config import config_to_yaml
    from megamoe.config.resolve import with_vocab
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.model.params import flops_per_token, meta_counts

    if cfg.data.tokenizer:
        vocab, source = load_tokenizer(cfg.data.tokenizer).get_vocab_size(), cfg.data.tokenizer
    else:
        vocab, source = cfg.data.vocab_size, "data.vocab_size"
    cfg = with_vocab(cfg, vocab, source)
    counts = meta_counts(cfg.model)
    print(config_to_yaml(cfg), end="")
    print(f"# parameters: total {counts.total:,} | active {counts.active:,} | embedding {counts.embedding:,}")
    print(f"# training FLOPs per token: {flops_per_token(cfg.model, counts):,.0f}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Train, or print the dry run."""
    from megamoe.cli.main import split_config_args
    from megamoe.train.run import load_run_config, setup_run
    from megamoe.train.trainer import Trainer

    cfg = load_run_config(*split_config_args(args.args))
    if args.dry_run:
        return dry_run(cfg)
    setup = setup_run(cfg, resume=args.resume, progress=cfg.logging.progress)
    summary = Trainer(setup).fit()
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
