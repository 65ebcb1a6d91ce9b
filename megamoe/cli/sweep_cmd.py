"""`megamoe sweep SWEEP.yaml`: run an ablation grid locally or as a SLURM array, then `--collect` the results."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("sweep", help="run a sweep of configs (grid, zipped lists, seeds, budgets); --collect results")
    p.add_argument("sweep", type=Path, help="the sweep YAML file")
    p.add_argument(
        "--parallel", type=int, default=1,
        help="jobs at a time, locally or as SLURM array tasks (a job: one run, or a trunk and then its branches)",
    )  # fmt: skip
    p.add_argument("--slurm", action="store_true", help="submit one SLURM array job (launch/sweep_array.sbatch)")
    p.add_argument("--gpus", type=int, default=8, help="--slurm: GPUs per run")
    p.add_argument("--time", default="24:00:00", help="--slurm: time limit per array task (all runs of its job)")
    p.add_argument(
        "--sbatch-arg", action="append", default=[], metavar="OPTION",
        help="--slurm: an sbatch option overriding the script's #SBATCH lines (repeatable), e.g. --cpus-per-task=4",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state (with --slurm: the sbatch)")
    p.add_argument("--collect", action="store_true", help="gather final metrics into results.csv/.md and curves.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List, run, submit or collect."""
    from megamoe.errors import MegamoeError
    from megamoe.sweep.archive import export_finished, restore
    from megamoe.sweep.collect import collect
    from megamoe.sweep.runner import describe, run_local, sbatch_script, submit
    from megamoe.sweep.spec import load_sweep

    if args.parallel < 1:
        raise MegamoeError("--parallel must be >= 1")
    sweep = load_sweep(args.sweep)
    if not args.dry_run and (restored := restore(sweep)):
        print(f"restored {len(restored)} finished runs from the archive {sweep.archive}")
    if args.collect:
        root, table = collect(sweep)
        print(table, end="")
        print(f"\nwritten to {root}/results.csv, results.md and curves.png")
        if sweep.archive is not None:
            print(f"{export_finished(sweep)} finished jobs archived in {sweep.archive}")
        return 0
    if args.slurm:
        script, jobs_text = sbatch_script(sweep, args.parallel, args.gpus, args.time)
        if args.dry_run:
            print(script, end="")
            print(f"# {sweep.root / 'jobs.json'}: one array task per job, its runs in order")
            for task, job in enumerate(describe(sweep)):
                print("".join(f"# task {task}: {line}\n#   {shlex.join(run.args)}\n" for run, line in job), end="")
            return 0
        print(submit(sweep, script, jobs_text, args.sbatch_arg))
        return 0
    if args.dry_run:
        for job in describe(sweep):
            print("".join(line + "\n" for _, line in job), end="")
        return 0
    failed = {name: rc for name, rc in run_local(sweep, args.parallel).items() if rc != 0}
    if failed:
        raise MegamoeError(f"sweep {sweep.name}: {len(failed)} runs failed: {', '.join(failed)} (see logs/)")
    return 0
