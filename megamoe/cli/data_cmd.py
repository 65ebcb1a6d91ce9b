"""`megamoe data prepare`: tokenize, order and pack a corpus into the data cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `data` and its `prepare` action."""
    p = sub.add_parser("data", help="prepare packed token data")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = actions.add_parser("prepare", help="tokenize and pack the configured corpus (cached)")
    prep.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="a YAML file and overrides")
    shards = prep.add_argument_group("sharded preparation (data.shard_documents > 0; docs/data.md)")
    shards.add_argument("--workers", type=int, default=1, help="shard tasks run at once on this machine")
    shards.add_argument("--slurm", action="store_true", help="submit the stages as SLURM array jobs and return")
    shards.add_argument("--partition", default="", help="--slurm: the partition ('' = the cluster's default)")
    shards.add_argument("--time", default="04:00:00", help="--slurm: time limit of each task")
    shards.add_argument("--cpus-per-task", type=int, default=1, help="--slurm: CPUs of each task")
    shards.add_argument("--mem-per-cpu-gb", type=int, default=2, help="--slurm: memory per CPU of each task")
    shards.add_argument("--max-parallel", type=int, default=-1, help="--slurm: array tasks at once (-1: no limit)")
    shards.add_argument(
        "--sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
        help="--slurm: an extra #SBATCH option of every job (repeatable), e.g. --sbatch-arg account=myproj",
    )  # fmt: skip
    prep.set_defaults(func=run_prepare)


def _slurm_options(args: argparse.Namespace):
    """The SLURM request of --slurm."""
    from megamoe.data.sharded import SlurmOptions
    from megamoe.errors import MegamoeError

    extra = {}
    for item in args.sbatch_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MegamoeError(f"--sbatch-arg {item!r}: expected KEY=VALUE, e.g. account=myproj")
        extra[key.lstrip("-")] = value
    return SlurmOptions(
        partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task,
        mem_per_cpu_gb=args.mem_per_cpu_gb, max_parallel=args.max_parallel, sbatch_args=extra,
    )  # fmt: skip


def _check_sharded(cfg, args: argparse.Namespace) -> bool:
    """True when the sharded launcher applies (--workers > 1 or --slurm); errors name what is wrong."""
    from megamoe.errors import ConfigError

    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    if args.workers == 1 and not args.slurm:
        return False
    if cfg.data.blend:
        raise ConfigError("data.blend", "--workers/--slurm prepare one source: run them once per source (data.path=…)")
    if not cfg.data.shard_documents:
        raise ConfigError("data.shard_documents", "is 0: --workers/--slurm need shards (e.g. =100000)")
    return True


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare (or find in the cache) the data of a config and print its manifest summary."""
    from megamoe.cli.main import split_config_args
    from megamoe.data import prepare_data

    config, overrides = split_config_args(args.args)
    if config is not None and (Path(config) / "config.yaml").is_file():  # a run directory: its saved config
        from megamoe.train.run import load_run_config  # imports torch.distributed (seconds): only when needed

        cfg = load_run_config(config, overrides)
    else:
        from megamoe.config import load_config

        cfg = load_config(config, overrides)
    if _check_sharded(cfg, args):
        from megamoe.data.sharded import prepare_sharded, submit_sharded

        if args.slurm:
            layout, jobs = submit_sharded(cfg.data, _slurm_options(args))
            if not jobs:
                print(f"prepared data: {layout.root} (already finished)")
                return 0
            print(f"submitted SLURM jobs {' '.join(jobs)}: the later stages chain after these")
            print(f"work and logs: {layout.work}; rerun this command to resubmit only unfinished shards")
            print(f"prepared data (when the jobs end): {layout.root}")
            return 0
        data = prepare_sharded(cfg.data, workers=args.workers, progress=cfg.logging.progress)
    else:
        data = prepare_data(cfg.data, progress=cfg.logging.progress)
    summary = {k: v for k, v in data.manifest.items() if k not in ("config", "settings")}
    print(json.dumps(summary, indent=2))
    for root in [s["root"] for s in data.manifest["blend"]] if cfg.data.blend else [data.root]:
        print(f"prepared data: {root}")
    return 0
