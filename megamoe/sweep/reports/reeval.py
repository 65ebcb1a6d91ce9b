"""The re-evaluation report: every finished run's final checkpoint evaluated again by `megamoe eval`.

`megamoe eval` loads the checkpoint as one fp32 model and runs it without autocast, on the first
`max_sequences` validation sequences spread evenly over the run's validation split (the same for every
run of one corpus and sequence length), so
runs trained in different precisions, or evaluated on a few batches during training, are compared on
equal terms. Its record (<run>/eval/step_<N>.json) is kept; a later collect reuses it.
Options: max_sequences (default 256); pairs: [[a, b], ...] variants compared seed by seed (a − b).
"""

from __future__ import annotations

import json
from pathlib import Path

from megamoe.sweep.collect import mean_std
from megamoe.sweep.reports import run_megamoe
from megamoe.sweep.spec import Sweep


def reevaluated(run_dir: Path, step: int, max_sequences: int) -> float:
    """The fp32 validation loss of the run's checkpoint at step, running `megamoe eval` when not yet recorded."""
    path = run_dir / "eval" / f"step_{step}.json"
    if not path.is_file() or json.loads(path.read_text())["sequences"] != max_sequences:
        run_megamoe("reeval", "eval", str(run_dir), "--max-sequences", str(max_sequences))
    record = json.loads(path.read_text())
    return next(d["loss"] for d in record["domains"] if d["domain"] == "all")


def _pair_cells(seeds: dict[int, tuple[float, float]]) -> str:
    """'training loss | re-evaluated loss' cells, each mean ± sample std over seeds."""
    return f"{mean_std([a for a, _ in seeds.values()])} | {mean_std([b for _, b in seeds.values()])}"


def report(sweep: Sweep, rows: list[dict], out_dir: Path, max_sequences: int = 256, pairs: list | None = None) -> str:
    """Per group: train-time and fp32 re-evaluated losses; per pair of variants (and budget): a − b seed by seed."""
    runs = {run.name: run for run in sweep.runs}
    losses: dict[tuple[str, int], dict[int, tuple[float, float]]] = {}
    names: dict[tuple[str, int], str] = {}
    for row in rows:
        run, key = runs[row["run"]], (runs[row["run"]].variant, row["step"])
        losses.setdefault(key, {})[row["seed"]] = (
            row["eval_loss"],
            reevaluated(run.run_dir, row["step"], max_sequences),
        )
        names[key] = row["group"]
    lines = [
        "## Re-evaluation in fp32",
        "",
        f"Each run's final checkpoint evaluated by `megamoe eval` (fp32, no autocast) on {max_sequences}",
        "validation sequences, next to the evaluation logged during training (the run's own precision,",
        "`train.eval_batches` batches). Mean ± sample std over seeds.",
        "",
        "| variant | seeds | val loss during training | val loss, fp32 re-evaluation |",
        "|---|---|---|---|",
        *(f"| {names[k]} | {len(s)} | {_pair_cells(s)} |" for k, s in losses.items()),
        "",
    ]
    for a, b in pairs or []:
        for steps in sorted({st for v, st in losses if v == a} & {st for v, st in losses if v == b}):
            la, lb = losses[a, steps], losses[b, steps]
            diffs = {s: la[s][1] - lb[s][1] for s in sorted(set(la) & set(lb))}
            each = ", ".join(f"seed {s}: {d:+.3f}" for s, d in diffs.items()) or "no shared seed yet"
            lines.append(f"- **{names[a, steps]} − {names[b, steps]}**, fp32 re-evaluation, paired by seed: {each}.")
    return "\n".join([*lines, ""])
