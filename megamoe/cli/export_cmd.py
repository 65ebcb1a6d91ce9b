"""`megamoe export RUN_DIR --out DIR`: a single-device safetensors model from any checkpoint layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("export", help="write model.safetensors + config.json + tokenizer.json for one device")
    p.add_argument("run_dir", type=Path, help="a run directory")
    p.add_argument("--out", type=Path, required=True, help="the folder to create (an existing one is refused)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder (default: the newest)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print where."""
    from megamoe.train.export import export_run

    out = export_run(args.run_dir, args.out, args.checkpoint)
    print(f"exported {args.run_dir} to {out}")
    return 0
