"""`megamoe` entry point: subcommands, logging setup, one-line user errors."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings

from megamoe.errors import MegamoeError


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """Positional args → (config path or run dir, key=value overrides)."""
    paths = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if len(paths) > 1:
        raise MegamoeError(f"expected one config file and key=value overrides, got {paths}")
    return (paths[0] if paths else None), overrides


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from megamoe.cli import (
        analyze_cmd,
        config_cmd,
        data_cmd,
        doctor_cmd,
        eval_cmd,
        export_cmd,
        generate_cmd,
        import_cmd,
        sweep_cmd,
        train_cmd,
    )

    parser = argparse.ArgumentParser(prog="megamoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_cmd.add_parser(sub)
    data_cmd.add_parser(sub)
    config_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    import_cmd.add_parser(sub)
    generate_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    analyze_cmd.add_parser(sub)
    sweep_cmd.add_parser(sub)
    doctor_cmd.add_parser(sub)
    return parser


def setup_logging() -> None:
    """INFO lines on stderr; quiet third-party loggers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("datasets", "urllib3", "filelock", "torch.distributed", "DeepSpeed", "megatron", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # megatron-core announces at import that it falls back to torch kernels without TE/apex: expected here.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""OSErrors that mean the disk (or a quota, or a file-size limit) is full: the user's to fix."""


def report(err: MegamoeError) -> int:
    """Print a user error as one line (once per run under torchrun); returns its exit status."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not err.same_on_every_rank:
        where = f" (rank {rank})" if rank else ""
        print(f"megamoe: error{where}: {err}", file=sys.stderr)
    return err.exit_status


def prefer_huge_pages() -> None:
    """torch's CPU tensors from 2 MiB up on transparent huge pages, unless THP_MEM_ALLOC_ENABLE is set already.

    glibc maps every block of 32 MiB or more afresh and unmaps it on free, so a CPU step faults in and zero-fills
    its big tensors (the (tokens, vocab) logits, their log-softmax and gradient) page by page, every step: 16,384
    faults per 64 MiB in 4 KiB pages, ~550 with huge pages. torch reads the variable at its first allocation, so
    this runs before any command imports torch; child processes (torchrun ranks, sweep runs) inherit it.
    Allocation placement changes no arithmetic (docs/benchmarks.md)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one line and exit 2 (3: training stopped on non-finite values)."""
    prefer_huge_pages()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["--help"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags = [a for a in extra if a.startswith("-")]
    if flags or (extra and not hasattr(args, "args")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.args = [*args.args, *extra]  # overrides written after a flag (`train RUN --resume k=v`)
    setup_logging()
    try:
        return int(args.func(args) or 0)
    except MegamoeError as err:
        return report(err)
    except OSError as err:
        if err.errno not in FULL_DISK:
            raise
        where = err.filename or "a file"
        return report(MegamoeError(f"{where}: {err.strerror}; free space (or raise the limit) and rerun"))
