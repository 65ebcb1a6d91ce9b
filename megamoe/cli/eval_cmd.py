"""`megamoe eval RUN_DIR`: perplexity overall and per domain on the run's held-out documents.

With --tasks, lm-evaluation-harness tasks instead (megamoe/interop/lm_eval_run.py), offline.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("eval", help="perplexity overall and per domain on the run's validation split")
    p.add_argument("run_dir", type=Path, help="a run directory")
    p.add_argument("--checkpoint", type=Path, default=None, help="this checkpoint (default: the newest)")
    p.add_argument("--max-sequences", type=int, default=0, help="at most this many val sequences (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences (lm-eval: requests) per forward pass")
    p.add_argument("--tasks", default=None, help="lm-eval tasks, comma-separated (next_line: built from the run)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many items per task")
    p.add_argument("--include-path", type=Path, action="append", default=[], help="lm-eval: a folder of task YAMLs")
    p.set_defaults(func=run)


def evaluate_run(run_dir: Path, checkpoint: Path | None, max_sequences: int, batch_size: int) -> dict:
    """The evaluation record: checkpoint, step, tokens, and loss/perplexity overall and per domain."""
    import torch

    from megamoe.data import prepare_data
    from megamoe.train.evaluate import eval_sums, spread_batches
    from megamoe.train.export import load_run_model
    from megamoe.train.run import load_run_config

    cfg = load_run_config(str(run_dir), [])
    model, meta = load_run_model(run_dir, checkpoint)
    data = prepare_data(cfg.data, progress=False)
    split, seq_len = data.split("val"), cfg.model.seq_len
    available = split.num_sequences(seq_len)
    wanted = min(available, max_sequences or available)
    batches = spread_batches(split, seq_len, wanted, batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sums = eval_sums(model.to(device), split, [(b, 1.0) for b in batches], seq_len, len(data.domains), device)
    rows = [_row("all", sums.loss_D.sum(), sums.count_D.sum())]
    if cfg.data.blend:  # each source's rows sum its '<source>/<domain>' rows
        for part, (lo, hi) in zip(data.parts, data.domain_ranges()):
            if sums.count_D[lo:hi].sum() > 0:
                rows.append(_row(part.name, sums.loss_D[lo:hi].sum(), sums.count_D[lo:hi].sum()))
    rows += [_row(name, sums.loss_D[d], sums.count_D[d]) for d, name in enumerate(data.domains) if sums.count_D[d]]
    return {
        "checkpoint": meta["checkpoint"],
        "step": meta["step"],
        "sequences": sum(len(b) for b in batches),
        "seq_len": seq_len,
        "routing": cfg.moe.routing,
        "unigram_val_ppl": data.manifest["unigram_val_ppl"],
        "domains": rows,
    }


def _row(name: str, loss_sum, count) -> dict:
    """One table row."""
    loss = float(loss_sum / count)
    return {"domain": name, "tokens": int(count), "loss": round(loss, 5), "ppl": round(math.exp(loss), 3)}


def markdown(record: dict) -> str:
    """The per-domain table."""
    lines = [
        f"step {record['step']}, {record['sequences']} val sequences of {record['seq_len']} tokens "
        f"(unigram baseline ppl {record['unigram_val_ppl']:.1f})",
        "",
        "| domain | tokens | loss | perplexity |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['domain']} | {r['tokens']:,} | {r['loss']:.4f} | {r['ppl']:.2f} |" for r in record["domains"]]
    return "\n".join(lines)


def lm_eval_options(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The task names and lm-eval settings, each bad flag a one-line error naming it."""
    from megamoe.errors import MegamoeError

    if args.max_sequences:
        raise MegamoeError("--max-sequences counts perplexity sequences; with --tasks use --limit")
    tasks = [t.strip() for t in args.tasks.split(",")]
    if not all(tasks):
        raise MegamoeError(f"--tasks: '{args.tasks}' has an empty task name")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise MegamoeError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and args.limit < 1:
        raise MegamoeError(f"--limit must be >= 1, got {args.limit}")
    for folder in args.include_path:
        if not folder.is_dir():
            raise MegamoeError(f"--include-path: {folder} is not a folder")
    options = {"num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size}
    return list(dict.fromkeys(tasks)), {**options, "include_paths": [p.resolve() for p in args.include_path]}


def run_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval on the run's checkpoint: write RUN_DIR/eval/lm_eval_step_<N>.json, .md; print the table."""
    from megamoe.interop import lm_eval_run

    tasks, options = lm_eval_options(args)
    rec = lm_eval_run.evaluate(args.run_dir, tasks, options, args.checkpoint)
    path = lm_eval_run.write(args.run_dir, rec)
    print(lm_eval_run.markdown(rec))
    print(f"\nwritten to {path} (and its .md and _samples.jsonl)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate, write RUN_DIR/eval/step_<N>.json and .md, print the table."""
    from megamoe.errors import MegamoeError
    from megamoe.utils.fs import atomic_write_json, atomic_write_text

    if args.max_sequences < 0 or args.batch_size < 1:
        raise MegamoeError("--max-sequences must be >= 0 and --batch-size >= 1")
    if not args.run_dir.is_dir():
        raise MegamoeError(f"{args.run_dir}: not a run directory")
    if args.tasks is not None:
        return run_lm_eval(args)
    extra = [f for f, v in (("--num-fewshot", args.num_fewshot), ("--limit", args.limit)) if v is not None]
    if extra or args.include_path:
        raise MegamoeError(f"{(extra or ['--include-path'])[0]} needs --tasks")
    record = evaluate_run(args.run_dir, args.checkpoint, args.max_sequences, args.batch_size)
    out = args.run_dir / "eval"
    out.mkdir(exist_ok=True)
    table = markdown(record)
    atomic_write_json(out / f"step_{record['step']}.json", record)
    atomic_write_text(out / f"step_{record['step']}.md", table + "\n")
    print(table)
    print(f"\nwritten to {out}/step_{record['step']}.json and .md")
    return 0
