"""`megamoe analyze RUN_DIR`: record routing over held-out data at one or more checkpoints, write report.md."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("analyze", help="routing analyses of a run: specialization, early routing, drops, Lory, RMoE")
    p.add_argument("run_dir", type=Path, help="a run directory")
    p.add_argument("--checkpoints", nargs="+", default=["latest"], help="checkpoint folders, 'all', or 'latest'")
    p.add_argument("--data", default=None, help="documents to analyse (data.path syntax); default: the run's val split")
    p.add_argument("--max-sequences", type=int, default=64, help="sequences recorded (evenly spread)")
    p.add_argument("--layer", type=int, default=None, help="block index analysed in detail (default: 3rd MoE layer)")
    p.add_argument("--min-count", type=int, default=128, help="token ids with fewer occurrences are left out")
    p.add_argument("--eval-capacity-factor", type=float, default=None, help="override moe.eval_capacity_factor")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/analysis)")
    p.set_defaults(func=run)


def checkpoints(run_dir: Path, wanted: list[str]) -> list[Path]:
    """The checkpoint folders named by --checkpoints, oldest first."""
    from megamoe.errors import MegamoeError
    from megamoe.train.checkpoint import latest_checkpoint, list_checkpoints

    if wanted == ["latest"]:
        found = latest_checkpoint(run_dir)
        paths = [found] if found else []
    elif wanted == ["all"]:
        paths = list_checkpoints(run_dir)
    else:
        paths = [Path(p) for p in wanted]
        missing = [str(p) for p in paths if not p.is_dir()]
        if missing:
            raise MegamoeError(f"--checkpoints: no checkpoint folder {', '.join(missing)}")
    if not paths:
        raise MegamoeError(f"{run_dir}: no checkpoint to analyse")
    return paths


def analysis_data(run_dir: Path, cfg, data_path: str | None):
    """(prepared data, split, description): the run's val split, or --data tokenized with the run's tokenizer."""
    import dataclasses

    from megamoe.data import prepare_data
    from megamoe.train.run import TOKENIZER_FILE

    if data_path is None:
        return prepare_data(cfg.data, progress=False), "val", "the run's validation split"
    data_cfg = dataclasses.replace(
        cfg.data,
        path=data_path,
        blend=None,
        tokenizer=str(run_dir / TOKENIZER_FILE),
        order="random",
        max_documents=0,
        exclude_domains=[],
        domain_field="",
    )
    # the model never saw these documents: analyse the larger (train) split of their preparation
    return prepare_data(data_cfg, progress=False), "train", f"{data_path} (95% of its documents)"


def run(args: argparse.Namespace) -> int:
    """Record each checkpoint (cached as analysis/routing_step_<N>.npz) and write the report."""
    import dataclasses

    import torch

    from megamoe.analysis.record import record_routing
    from megamoe.analysis.report import write_report
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.errors import MegamoeError
    from megamoe.train.evaluate import spread_batches
    from megamoe.train.export import load_run_model
    from megamoe.train.run import TOKENIZER_FILE, load_run_config

    if not args.run_dir.is_dir():
        raise MegamoeError(f"{args.run_dir}: not a run directory")
    cfg = load_run_config(str(args.run_dir), [])
    if not cfg.moe.enabled:
        raise MegamoeError(f"{args.run_dir}: a dense run (moe.routing: none) has no routing to analyse")
    out = args.out or args.run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    data, split_name, source = analysis_data(args.run_dir, cfg, args.data)
    split = data.split(split_name)
    seq_len = cfg.model.seq_len
    batches = spread_batches(split, seq_len, max(args.max_sequences, 1), 8)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recordings = []
    for path in checkpoints(args.run_dir, args.checkpoints):
        model, meta = load_run_model(args.run_dir, path)
        ecf = cfg.moe.eval_capacity_factor if args.eval_capacity_factor is None else args.eval_capacity_factor
        for module in model.modules():
            if hasattr(module, "record_routing"):
                module.cfg = dataclasses.replace(module.cfg, eval_capacity_factor=ecf)
        info = {
            "run": str(args.run_dir),
            "step": meta["step"],
            "routing": cfg.moe.routing,
            "source": source,
            "num_experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k,
            "domains": data.domains,
            "eval_capacity_factor": ecf,
        }
        rec = record_routing(model.to(device), split, seq_len, batches, info)
        rec.save(out / f"routing_step_{meta['step']}.npz")
        recordings.append(rec)
        print(f"recorded step {meta['step']}: {len(rec.token_T):,} tokens, MoE layers {list(rec.layers)}")
    recordings.sort(key=lambda r: r.meta["step"])
    tok = load_tokenizer(args.run_dir / TOKENIZER_FILE, key=str(args.run_dir))
    try:
        report = write_report(recordings, out, lambda i: tok.decode([i]), args.layer, args.min_count)
    except ValueError as err:
        raise MegamoeError(str(err)) from None
    print(f"report: {report}")
    return 0
