"""`megamoe export RUN_DIR --out DIR [--format megamoe|hf]`: a single-device model from any checkpoint layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("export", help="write a single-device model folder (megamoe's own, or for transformers)")
    p.add_argument("run_dir", type=Path, help="a run directory")
    p.add_argument("--out", type=Path, required=True, help="the folder to create (an existing one is refused)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder (default: the newest)")
    p.add_argument(
        "--format", choices=("megamoe", "hf"), default="megamoe",
        help="megamoe: model.safetensors + config.json + tokenizer.json; hf: a transformers model folder",
    )  # fmt: skip
    p.add_argument(
        "--remote-code", action="store_true",
        help="hf: write megamoe's own class (trust_remote_code) even where a native transformers class fits",
    )  # fmt: skip
    p.add_argument(
        "--dropless-tolerance", type=float, default=None, metavar="NATS",
        help="hf: refuse if dropping the eval capacity changes the mean per-token loss by more (default 0.01)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print where (and, for hf, as which class and why)."""
    from megamoe.errors import MegamoeError

    if args.format != "hf":
        if args.remote_code or args.dropless_tolerance is not None:
            raise MegamoeError("--remote-code and --dropless-tolerance apply to --format hf only")
        from megamoe.train.export import export_run

        print(f"exported {args.run_dir} to {export_run(args.run_dir, args.out, args.checkpoint)}")
        return 0
    from megamoe.interop.hf_export import DEFAULT_DROPLESS_TOLERANCE, export_hf

    tolerance = DEFAULT_DROPLESS_TOLERANCE if args.dropless_tolerance is None else args.dropless_tolerance
    if tolerance < 0:
        raise MegamoeError(f"--dropless-tolerance must be >= 0, got {tolerance}")
    report = export_hf(args.run_dir, args.out, args.checkpoint, args.remote_code, tolerance)
    if report.target is None:  # the folder already held this export
        print(f"{report.out} already holds the transformers export of this checkpoint")
        return 0
    trust = ", load with trust_remote_code=True" if report.target.kind == "megamoe" else ""
    print(f"exported {args.run_dir} to {report.out} as {report.target.kind} ({report.target.why}{trust})")
    for note in report.notes:
        print(f"note: {note}")
    return 0
