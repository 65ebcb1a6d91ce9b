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
    prep.set_defaults(func=run_prepare)


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
    data = prepare_data(cfg.data, progress=cfg.logging.progress)
    summary = {k: v for k, v in data.manifest.items() if k not in ("config", "settings")}
    print(json.dumps(summary, indent=2))
    for root in [s["root"] for s in data.manifest["blend"]] if cfg.data.blend else [data.root]:
        print(f"prepared data: {root}")
    return 0
