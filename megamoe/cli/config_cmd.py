"""`megamoe config`: print the resolved config, or the table of every key."""

from __future__ import annotations

import argparse

from megamoe.config import Config, config_to_yaml
from megamoe.config.docs import keys_markdown


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("config", help="print the resolved config or the documented key table")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="a YAML file and overrides")
    p.add_argument("--keys", action="store_true", help="print every key with type, default and meaning (markdown)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the config or the key table."""
    from megamoe.cli.main import split_config_args
    from megamoe.train.run import load_run_config

    if args.keys:
        print(keys_markdown(Config), end="")
        return 0
    print(config_to_yaml(load_run_config(*split_config_args(args.args))), end="")
    return 0
