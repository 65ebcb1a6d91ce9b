"""`megamoe import-hf DIR --out RUN_DIR [CONFIG] [key=value ...]`: a local HF dense checkpoint → a megamoe run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "import-hf", help="import a local Llama/Mistral/Qwen2 checkpoint as a run (upcycled when the config is MoE)"
    )
    p.add_argument("hf_dir", type=Path, help="a folder with config.json, tokenizer.json and safetensors")
    p.add_argument("--out", type=Path, required=True, help="the run directory to create")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="a YAML config and overrides (moe.*, train.*)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import and print what to do next."""
    from megamoe.cli.main import split_config_args
    from megamoe.interop.hf_import import import_hf

    config, overrides = split_config_args(args.args)
    path = import_hf(args.hf_dir, args.out, config, overrides)
    print(f"imported {args.hf_dir} to {path}")
    print(f"continue with `megamoe train {args.out} --resume`, or start runs with model.init_from={args.out}")
    return 0
